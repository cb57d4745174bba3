"""Offline users with exactly the Random User API 1.4 shape, schema traps included.

The generator is pure and deterministic: the user at stream position ``p`` for seed ``s`` is a
function of ``(s, p, nats)`` only (plus ``now`` for the two ``age`` fields, which the real API
also computes against the current time). One ``random.Random`` per user, seeded from a blake2b
of ``(seed, position)``, so any position can be produced without generating the ones before it.

The quirks of the real API are reproduced on purpose, because the daemon must survive them:

- ``location.postcode`` is a **string** for CA ("K1L 8T2"), GB ("SW4 9QD"), NL ("1234 AB") and
  NO ("0150", digits with a meaningful leading zero), and an **int** for every other
  nationality (AU BR CH DE DK ES FI FR IE IN IR MX NZ RS TR UA US). See ``STRING_POSTCODE_NATS``.
- ``id`` is ``{"name": "", "value": None}`` for IR, NZ, TR and UA (``NO_ID_NATS``).
- ``coordinates`` are strings ("-69.8246"), ``street.number`` is an int.
- Names, streets and cities are non-ASCII: umlauts (DE/CH), Persian script (IR), Cyrillic
  (UA, RS), Turkish dotless i, Nordic letters. ``email`` is always ASCII (romanised).
- CA and UA phone numbers contain letters, as the real generator's format strings produce.
- The timezone is drawn independently of the nationality, like the real API.

``login.uuid`` is derived from ``(seed, position)`` alone, so it is unique per position and
identical whatever ``nats`` filter is used (the real API behaves the same way: its uuid stream
does not depend on the nationality).

The producer takes *prepared* pages (`SyntheticSource.fetch_prepared`, `prepare_page`): each
user validated and encoded once, where it is generated. A fast stream's pages are prepared
in a child process (`pagegen`), so that their generation runs on another core: a page of
`OFFLOAD_MIN_USERS` or more, or any page while users are asked for at `OFFLOAD_MIN_PER_S`
or more (a rate raised on reload keeps its page size). A slow stream's pages, whose
generation costs next to nothing, are made in the event loop, in chunks.
"""

from __future__ import annotations

import hashlib
import math
import random
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import msgspec
import trio

from ..errors import InvalidRecord
from ..stream.records import parse_user, scrub
from .fields import keyed_selection, select, selected
from .pagegen import PageGenerator, PageRequest, PreparedPage

__all__ = [
    "NATIONALITIES",
    "NO_ID_NATS",
    "OFFLOAD_MIN_PER_S",
    "OFFLOAD_MIN_USERS",
    "STRING_POSTCODE_NATS",
    "SyntheticSource",
    "prepare_page",
    "synthetic_page",
    "synthetic_user",
]

NATIONALITIES: tuple[str, ...] = (
    "AU", "BR", "CA", "CH", "DE", "DK", "ES", "FI", "FR", "GB", "IE",
    "IN", "IR", "MX", "NL", "NO", "NZ", "RS", "TR", "UA", "US",
)  # fmt: skip
STRING_POSTCODE_NATS: frozenset[str] = frozenset({"CA", "GB", "NL", "NO"})
NO_ID_NATS: frozenset[str] = frozenset({"IR", "NZ", "TR", "UA"})

# The real generator's constants (api/1.4/api.js): dob and registered are drawn in ms since the
# epoch, up to a fixed "constant time" (2022-05-23) so that a seed always yields the same dates.
_CONSTANT_TIME_MS = 1_653_344_189_000
_DOB_RANGE_MS = (-800_000_000_000, _CONSTANT_TIME_MS - 86_400_000 * 365 * 21)
_REGISTERED_RANGE_MS = (1_016_688_461_000, _CONSTANT_TIME_MS)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PICTURE_BASE = "https://randomuser.me/api/portraits/"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ1234567890"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_DIGITS = "0123456789"

# Pattern mini-language for phones, ids and postcodes: '#' a digit, '@' an uppercase letter,
# '{field}' a value derived from the user (see _derived_fields). A compiled pattern is a
# str.format template with one '{}' per slot, the slot kinds, and 10**slots when all are digits
# (then one random draw fills the whole pattern).
_T = TypeVar("_T")
_Pattern = tuple[str, str, int]


def _compile(pattern: str) -> _Pattern:
    template = "".join("{}" if ch in "#@" else {"{": "{{", "}": "}}"}.get(ch, ch) for ch in pattern)
    kinds = "".join(ch for ch in pattern if ch in "#@")
    return template, kinds, 0 if "@" in kinds else 10 ** len(kinds)


def _render(pattern: _Pattern, rand: Callable[[], float]) -> str:
    template, kinds, scale = pattern
    if scale:
        return template.format(*str(int(rand() * scale)).zfill(len(kinds)))
    return template.format(
        *[_UPPER[int(rand() * 26)] if k == "@" else _DIGITS[int(rand() * 10)] for k in kinds]
    )


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Romanisation for emails: Ukrainian (national system) and Serbian (Latin alphabet) Cyrillic.
_UKRAINIAN = dict(
    zip(
        "абвгґдеєжзиіїйклмнопрстуфхцчшщьюя",
        _words("a b v h g d e ye zh z y i yi y k l m n o p r s t u f kh ts ch sh shch _ yu ya"),
        strict=True,
    )
)
_UKRAINIAN["ь"] = ""  # the soft sign is dropped
_SERBIAN = dict(
    zip(
        "абвгдђежзијклљмнњопрстћуфхцчџш",
        _words("a b v g d dj e z z i j k l lj m n nj o p r s t c u f h c c dz s"),
        strict=True,
    )
)
_SPECIAL = {"ß": "ss", "ø": "o", "æ": "ae", "ı": "i", "đ": "dj", "ð": "d", "þ": "th", "œ": "oe"}


def _romanise(text: str, table: dict[str, str]) -> str:
    """ASCII, lower case, no spaces: what the real API's transliteration does for emails."""
    out = []
    for ch in text.lower():
        ch = table.get(ch, _SPECIAL.get(ch, ch))
        out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode())
    return "".join(out).replace(" ", "")


_ASCII: dict[str, str] = {}  # every first/last name -> its romanised email part


def _names(spec: str, table: dict[str, str]) -> tuple[str, ...]:
    """'a|b|c' -> ('a', 'b', 'c'); 'نام:nam' entries carry their own romanisation (Persian)."""
    names = []
    for entry in spec.split("|"):
        native, _, latin = entry.partition(":")
        _ASCII[native] = latin or _romanise(native, table)
        names.append(native)
    return tuple(names)


@dataclass(frozen=True, slots=True)
class _Nat:
    country: str
    male: tuple[str, ...]
    female: tuple[str, ...]
    last: tuple[str, ...]
    streets: tuple[str, ...]
    cities: tuple[str, ...]
    states: tuple[str, ...]
    phone: _Pattern
    cell: _Pattern
    postcode: tuple[int, int] | tuple[_Pattern, ...]  # int range, or str patterns
    id_name: str
    id_value: _Pattern | None
    titles: tuple[tuple[str, ...], tuple[str, ...]] = (("Mr",), ("Miss", "Mrs", "Ms"))


def _nat(
    country: str,
    male: str,
    female: str,
    last: str,
    streets: str,
    cities: str,
    states: str,
    phone: str,
    cell: str,
    postcode: tuple[int, int] | str,
    id_name: str,
    id_value: str | None,
    titles: tuple[str, str] | None = None,
) -> _Nat:
    table = {"Ukraine": _UKRAINIAN, "Serbia": _SERBIAN}.get(country, {})
    return _Nat(
        country=country,
        male=_names(male, table),
        female=_names(female, table),
        last=_names(last, table),
        streets=tuple(streets.split("|")),
        cities=tuple(cities.split("|")),
        states=tuple(states.split("|")),
        phone=_compile(phone),
        cell=_compile(cell),
        postcode=postcode
        if isinstance(postcode, tuple)
        else tuple(_compile(p) for p in postcode.split("|")),
        id_name=id_name,
        id_value=None if id_value is None else _compile(id_value),
        titles=(("Mr",), ("Miss", "Mrs", "Ms"))
        if titles is None
        else (tuple(titles[0].split("|")), tuple(titles[1].split("|"))),
    )


# fmt: off
_NATS: dict[str, _Nat] = {
    "AU": _nat("Australia", "Liam|Noah|Jack|William|Oliver|Lucas|Cooper|Riley",
               "Charlotte|Olivia|Mia|Ava|Chloe|Isla|Zoe|Ella",
               "Smith|Jones|Williams|Brown|Wilson|Taylor|Nguyen|Walker|Harris|Martin",
               "George Street|Victoria Road|Park Avenue|Mill Road|Hunter Street|Church Street",
               "Sydney|Melbourne|Brisbane|Perth|Adelaide|Hobart|Geelong|Cairns",
               "New South Wales|Victoria|Queensland|Western Australia|South Australia|Tasmania",
               "0#-####-####", "04##-###-###", (200, 9999), "TFN", "#########"),
    "BR": _nat("Brazil", "João|Pedro|Lucas|Matheus|Gabriel|Luís|Caio|Otávio",
               "Maria|Ana|Júlia|Letícia|Beatriz|Lívia|Débora|Luana",
               "Silva|Santos|Oliveira|Souza|Araújo|Gonçalves|Conceição|Ribeiro|Moraes",
               "Rua São Jorge|Rua Dois|Avenida Brasil|Rua Bela Vista|Travessa dos Açorianos",
               "São Paulo|Rio de Janeiro|Belo Horizonte|Curitiba|Florianópolis|Maceió|Goiânia",
               "São Paulo|Rio de Janeiro|Minas Gerais|Paraná|Santa Catarina|Alagoas|Goiás|Pará",
               "(##) ####-####", "(##) #####-####", (10000, 99999), "CPF", "###.###.###-##"),
    "CA": _nat("Canada", "Liam|Ethan|Noah|Logan|Nathan|Félix|Samuel|William",
               "Emma|Olivia|Chloé|Léa|Sophie|Charlotte|Maya|Abigail",
               "Tremblay|Gagnon|Roy|Côté|Bouchard|Smith|Brown|Martin|Wilson|Lavoie",
               "King St|Queen St|Dufferin St|Rue Principale|Bay Ave|Main St|Lakeshore Rd",
               "Toronto|Montréal|Vancouver|Calgary|Ottawa|Québec|Winnipeg|Halifax",
               "Ontario|Québec|British Columbia|Alberta|Manitoba|Nova Scotia|Saskatchewan",
               "@## @##-####", "@## @##-####", "@#@ #@#", "SIN", "#########"),
    "CH": _nat("Switzerland", "Luca|Noah|Jonas|Mathis|Fabian|Rémy|Gian|Nicolas",
               "Léa|Nina|Mia|Chiara|Anaïs|Laura|Sophie|Jana",
               "Müller|Meier|Schmid|Keller|Weber|Huber|Dubois|Rossi|Fontana|Girard",
               "Bahnhofstrasse|Rue de la Gare|Via Cantonale|Schulstrasse|Rue du Château",
               "Zürich|Genève|Basel|Lausanne|Bern|Lugano|Biel/Bienne|Neuchâtel",
               "Zürich|Genève|Basel-Stadt|Vaud|Bern|Ticino|Graubünden|Neuchâtel",
               "0## ### ## ##", "07# ### ## ##", (1000, 9999), "AVS", "756.####.####.##"),
    "DE": _nat("Germany", "Jürgen|Lukas|Maximilian|Jörg|Günter|Felix|Matthias|Björn",
               "Sophie|Jülide|Käthe|Hannelore|Lena|Marie|Anke|Gisela",
               "Müller|Schmidt|Schneider|Fischer|Weiß|Köhler|Günther|Bäcker|Krüger|Wolf",
               "Grüner Weg|Schloßstraße|Mühlenweg|Lindenstraße|Gartenstraße|Königsallee",
               "München|Köln|Düsseldorf|Nürnberg|Lübeck|Göttingen|Berlin|Hamburg",
               "Bayern|Nordrhein-Westfalen|Baden-Württemberg|Thüringen|Sachsen|Hessen",
               "0###-#######", "017#-#######", (10000, 99999), "SVNR",
               "## {ddmmyy} {initial} {svnr_sex}#"),
    "DK": _nat("Denmark", "Søren|Mikkel|Frederik|Mads|Jens|Emil|Rasmus|Anders",
               "Ida|Freja|Sofie|Mathilde|Karoline|Astrid|Ellen|Signe",
               "Jensen|Nielsen|Hansen|Pedersen|Jørgensen|Møller|Sørensen|Kristensen",
               "Nørregade|Østergade|Vestervang|Skovvej|Åboulevard|Kirkevej|Søndergade",
               "København|Aarhus|Odense|Aalborg|Esbjerg|Randers|Kolding|Århus C",
               "Hovedstaden|Midtjylland|Syddanmark|Nordjylland|Sjælland",
               "########", "########", (1000, 9999), "CPR", "{ddmmyy}-####"),
    "ES": _nat("Spain", "José|Antonio|Manuel|Francisco|Javier|Ángel|Rubén|Jesús",
               "María|Carmen|Lucía|Sofía|Inés|Pilar|Nuria|Mercedes",
               "García|Fernández|González|Rodríguez|López|Martínez|Sánchez|Muñoz|Núñez",
               "Calle de Alcalá|Avenida de Andalucía|Calle Mayor|Paseo de Extremadura",
               "Madrid|Barcelona|Valencia|Sevilla|Zaragoza|Málaga|Córdoba|Alcalá de Henares",
               "Comunidad de Madrid|Cataluña|Comunidad Valenciana|Andalucía|Aragón|Galicia",
               "9##-###-###", "6##-###-###", (10000, 99999), "DNI", "########-@"),
    "FI": _nat("Finland", "Jussi|Väinö|Eetu|Mikko|Onni|Aleksi|Juho|Lauri",
               "Aino|Siiri|Eevi|Helmi|Pihla|Aada|Sanni|Venla",
               "Korhonen|Virtanen|Mäkinen|Nieminen|Mäkelä|Hämäläinen|Laine|Järvinen",
               "Hämeenkatu|Mannerheimintie|Pyynikintie|Itsenäisyydenkatu|Rautatienkatu",
               "Helsinki|Espoo|Tampere|Vantaa|Oulu|Turku|Jyväskylä|Hämeenlinna",
               "Uusimaa|Pirkanmaa|Pohjois-Pohjanmaa|Varsinais-Suomi|Keski-Suomi|Lappi",
               "0#-###-###", "04#-###-##-##", (10000, 99999), "HETU",
               "{ddmmyy}{hetu_century}###@"),
    "FR": _nat("France", "Lucas|Hugo|Théo|Mathis|Clément|Jérôme|Noé|Maxime",
               "Léa|Chloé|Manon|Inès|Camille|Élodie|Océane|Zoé",
               "Martin|Bernard|Dubois|Thomas|Robert|Richard|Petit|Durand|Lefèvre|Mercier",
               "Rue de la Gare|Rue Pasteur|Avenue Jean-Jaurès|Rue du Bât-d'Argent",
               "Paris|Marseille|Lyon|Toulouse|Nice|Nantes|Besançon|Orléans",
               "Île-de-France|Provence-Alpes-Côte d'Azur|Auvergne-Rhône-Alpes|Occitanie",
               "0#-##-##-##-##", "06-##-##-##-##", (1000, 99999), "INSEE",
               "{insee_sex}{yy}{mm}######## ##", ("Monsieur", "Madame|Mademoiselle")),
    "GB": _nat("United Kingdom", "Oliver|George|Harry|Jack|Charlie|Alfie|Callum|Rhys",
               "Amelia|Isla|Poppy|Sophie|Jessica|Eleanor|Megan|Siobhan",
               "Smith|Jones|Taylor|Brown|Davies|Evans|Wilson|Thomas|O'Connor|Wright",
               "High Street|Church Lane|Station Road|Victoria Road|Mill Lane|The Green",
               "London|Manchester|Birmingham|Leeds|Bristol|Cardiff|Edinburgh|Belfast",
               "Greater London|Greater Manchester|West Midlands|West Yorkshire|Lothian",
               "0#### ######", "07### ######", "@# #@@|@@# #@@|@@## #@@", "NINO",
               "@@ ## ## ## @"),
    "IE": _nat("Ireland", "Seán|Conor|Cian|Oisín|Darragh|Pádraig|Liam|Eoin",
               "Aoife|Siobhán|Niamh|Saoirse|Caoimhe|Róisín|Laura|Ciara",
               "Murphy|Kelly|O'Sullivan|Walsh|Byrne|Ryan|O'Brien|Woods|Doyle|McCarthy",
               "Henry Street|Main Street|O'Connell Street|Grafton Street|Patrick Street",
               "Dublin|Cork|Galway|Limerick|Waterford|Kilkenny|Blessington|Tralee",
               "Dublin|Cork|Galway|Limerick|Waterford|Kilkenny|Wexford|Kerry",
               "0##-###-####", "08#-###-####", (10000, 99999), "PPS", "#######@"),
    "IN": _nat("India", "Aarav|Vihaan|Arjun|Rohan|Karthik|Siddharth|Rahul|Vikram",
               "Ananya|Diya|Priya|Sanya|Kavya|Ishita|Meera|Nandini",
               "Sharma|Patel|Reddy|Iyer|Nair|Gupta|Singh|Kumar|Menon|Chatterjee",
               "MG Road|Station Road|Nehru Nagar|Gandhi Marg|Park Street|Brigade Road",
               "Mumbai|Delhi|Bengaluru|Chennai|Kolkata|Hyderabad|Pune|Jaipur",
               "Maharashtra|Delhi|Karnataka|Tamil Nadu|West Bengal|Telangana|Rajasthan",
               "9#########", "8#########", (100000, 999999), "UIDAI", "############"),
    "IR": _nat("Iran",
               "آرمین:armin|علی:ali|محمد:mohammad|امیرحسین:amirhossein|پارسا:parsa|رضا:reza",
               "نازنین:nazanin|زهرا:zahra|مریم:maryam|سارا:sara|نیلوفر:niloofar|یاسمن:yasaman",
               "محمدی:mohammadi|احمدی:ahmadi|رضایی:rezaei|حسینی:hosseini|کریمی:karimi|"
               "موسوی:mousavi|جعفری:jafari|صادقی:sadeghi",
               "میدان انقلاب|شهید بهشتی|ولیعصر|آزادی|کارگر|فاطمی|پارک طالقانی",
               "تهران|مشهد|اصفهان|کرج|شیراز|تبریز|قم|اهواز",
               "تهران|خراسان رضوی|اصفهان|البرز|فارس|آذربایجان شرقی|قم|خوزستان",
               "0##-########", "09##-###-####", (10000, 99999), "", None),
    "MX": _nat("Mexico", "José|Juan|Luis|Alejandro|Ramón|Héctor|Raúl|Sebastián",
               "Guadalupe|María|Ximena|Fernanda|Valeria|Sofía|Lucía|Mónica",
               "Hernández|García|Martínez|López|González|Pérez|Sánchez|Ramírez|Cruz",
               "Avenida Juárez|Calle Hidalgo|Avenida Insurgentes|Calle Morelos|Privada Reforma",
               "Ciudad de México|Guadalajara|Monterrey|Puebla|Mérida|Querétaro|Tijuana|León",
               "Ciudad de México|Jalisco|Nuevo León|Puebla|Yucatán|Querétaro|Guanajuato",
               "(6##) ### ####", "(6##) ### ####", (10000, 99999), "NSS", "## ## ## ####-#"),
    "NL": _nat("Netherlands", "Daan|Sem|Lucas|Joël|Bram|Thijs|Jeroen|Sven",
               "Emma|Tess|Sanne|Fenna|Noë|Anouk|Lotte|Maaike",
               "de Jong|Jansen|de Vries|van den Berg|van Dijk|Bakker|Visser|Smit|de Boer",
               "Kerkstraat|Dorpsstraat|Molenweg|Julianalaan|Stationsweg|Prinsengracht",
               "Amsterdam|Rotterdam|Den Haag|Utrecht|Eindhoven|Groningen|'s-Hertogenbosch",
               "Noord-Holland|Zuid-Holland|Utrecht|Noord-Brabant|Groningen|Gelderland",
               "(0##) #######", "(06) ########", "#### @@", "BSN", "########"),
    "NO": _nat("Norway", "Bjørn|Håkon|Ole|Magnus|Sindre|Ørjan|Eirik|Jonas",
               "Ingrid|Sigrid|Åse|Marte|Solveig|Nora|Thea|Kari",
               "Hansen|Johansen|Olsen|Larsen|Andersen|Nilsen|Kristiansen|Bjørnstad|Sæther",
               "Storgata|Kirkeveien|Skogveien|Bjørnstadveien|Fjellveien|Sjøgata",
               "Oslo|Bergen|Trondheim|Stavanger|Tromsø|Drammen|Fredrikstad|Ålesund",
               "Oslo|Vestland|Trøndelag|Rogaland|Troms og Finnmark|Viken|Møre og Romsdal",
               "########", "4#######", "####", "FN", "{ddmmyy}#####"),
    "NZ": _nat("New Zealand", "Oliver|Jack|Nikau|Liam|Tama|Hunter|Manaia|Lachlan",
               "Charlotte|Isla|Aroha|Mia|Anahera|Ruby|Ngaio|Harper",
               "Smith|Wilson|Williams|Brown|Taylor|Ngata|Walker|Te Whare|Robinson",
               "Great South Road|Queen Street|Cuba Street|Ponsonby Road|Karangahape Road",
               "Auckland|Wellington|Christchurch|Hamilton|Tauranga|Dunedin|Whangārei",
               "Auckland|Wellington|Canterbury|Waikato|Bay of Plenty|Otago|Hawke's Bay",
               "(###)-###-####", "(###)-###-####", (1000, 9999), "", None),
    "RS": _nat("Serbia", "Милош|Марко|Никола|Стефан|Лазар|Душан|Вук|Ђорђе",
               "Милица|Јована|Ана|Теодора|Марија|Јелена|Мила|Невена",
               "Јовановић|Петровић|Николић|Марковић|Ђорђевић|Стојановић|Илић|Павловић",
               "Кнеза Милоша|Булевар ослобођења|Његошева|Карађорђева|Цара Душана",
               "Београд|Нови Сад|Ниш|Крагујевац|Суботица|Чачак|Ваљево|Зрењанин",
               "Београд|Јужнобачки|Нишавски|Шумадијски|Севернобачки|Моравички|Колубарски",
               "0##-####-###", "06#-####-###", (10000, 99999), "SID", "#########"),
    "TR": _nat("Turkey", "Mehmet|Mustafa|Ahmet|Çağlar|Ömer|Şükrü|Yiğit|İsmail",
               "Ayşe|Fatma|Zeynep|Şebnem|Gülşen|Özlem|Büşra|Irmak",
               "Yılmaz|Kaya|Demir|Şahin|Çelik|Yıldız|Öztürk|Aydın|Özdemir|Arslan",
               "Atatürk Sk|Bağdat Cd|İstiklal Cd|Fatih Sultan Mehmet Cd|Şehitler Cd",
               "İstanbul|Ankara|İzmir|Bursa|Antalya|Eskişehir|Şanlıurfa|Diyarbakır",
               "İstanbul|Ankara|İzmir|Bursa|Antalya|Eskişehir|Şanlıurfa|Diyarbakır",
               "(###)-###-####", "(###)-###-####", (10000, 99999), "", None),
    "UA": _nat("Ukraine", "Тарас|Богдан|Олександр|Андрій|Євген|Ярослав|Остап|Юрій",
               "Оксана|Олена|Ірина|Наталія|Юлія|Софія|Ганна|Людмила",
               "Шевченко|Коваленко|Бондаренко|Ткаченко|Кравченко|Олійник|Мельник|Поліщук",
               "Хрещатик|Шевченка|Франка|Грушевського|Сагайдачного|Лесі Українки",
               "Київ|Харків|Одеса|Дніпро|Львів|Запоріжжя|Вінниця|Чернігів",
               "Київська|Харківська|Одеська|Дніпропетровська|Львівська|Вінницька",
               "(06#) @##-####", "(09#) @##-####", (10000, 99999), "", None),
    "US": _nat("United States", "James|John|Robert|Michael|William|David|Brandon|Tyler",
               "Mary|Jennifer|Linda|Jessica|Ashley|Brittany|Megan|Jennie",
               "Smith|Johnson|Williams|Brown|Jones|Miller|Davis|Garcia|Rodriguez|Wilson",
               "Main St|Oak Lawn Ave|Washington Ave|Pecan Acres Ln|Hickory Creek Dr",
               "Houston|Phoenix|Chicago|Seattle|Denver|Boston|Nashville|Portland",
               "Texas|Arizona|Illinois|Washington|Colorado|Massachusetts|Tennessee|Oregon",
               "(###) ###-####", "(###) ###-####", (10000, 99999), "SSN", "###-##-####"),
}
_TIMEZONES: tuple[tuple[str, str], ...] = (
    ("-12:00", "Eniwetok, Kwajalein"), ("-10:00", "Hawaii"), ("-9:00", "Alaska"),
    ("-8:00", "Pacific Time (US & Canada)"), ("-7:00", "Mountain Time (US & Canada)"),
    ("-6:00", "Central Time (US & Canada), Mexico City"),
    ("-5:00", "Eastern Time (US & Canada), Bogota, Lima"),
    ("-3:30", "Newfoundland"), ("-3:00", "Brazil, Buenos Aires, Georgetown"),
    ("0:00", "Western Europe Time, London, Lisbon, Casablanca"),
    ("+1:00", "Brussels, Copenhagen, Madrid, Paris"), ("+2:00", "Kaliningrad, South Africa"),
    ("+3:00", "Baghdad, Riyadh, Moscow, St. Petersburg"), ("+3:30", "Tehran"),
    ("+5:30", "Bombay, Calcutta, Madras, New Delhi"), ("+5:45", "Kathmandu"),
    ("+8:00", "Beijing, Perth, Singapore, Hong Kong"), ("+9:30", "Adelaide, Darwin"),
    ("+10:00", "Eastern Australia, Guam, Vladivostok"),
    ("+12:00", "Auckland, Wellington, Fiji, Kamchatka"),
)
_USER1 = _words("angry happy silver tiny lazy heavy crazy brown purple golden orange beautiful"
               " ticklish sad organic black red blue yellow white")
_USER2 = _words("ostrich bear lion tiger rabbit duck goose peacock koala fish wolf frog butterfly"
               " leopard elephant swan panda cat dog bird")
_PASSWORDS = _words("racers password 123456 qwerty monkey dragon letmein trustno1 sunshine master"
                   " shadow football baseball iloveyou superman starwars hockey killer charlie"
                   " jordan")
# fmt: on
assert tuple(sorted(_NATS)) == NATIONALITIES
assert {c for c, n in _NATS.items() if not isinstance(n.postcode[0], int)} == STRING_POSTCODE_NATS
assert {c for c, n in _NATS.items() if n.id_value is None} == NO_ID_NATS


def _pool(nats: Sequence[str] | str) -> tuple[str, ...]:
    """The nationalities to draw from: like the API, one invalid code drops the whole filter."""
    if isinstance(nats, str):
        nats = nats.split(",")
    codes = [code.strip().upper() for code in nats if code.strip()]
    if not codes or any(code not in _NATS for code in codes):
        return NATIONALITIES
    return tuple(dict.fromkeys(codes))


def _date(ms: int) -> tuple[datetime, str]:
    when = _EPOCH + timedelta(milliseconds=ms)
    text = (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}.{ms % 1000:03d}Z"
    )
    return when, text


def _age(born: datetime, now: datetime) -> int:
    """Whole years from `born` to `now` (dayjs `diff(..., 'years')`, as the API does)."""
    years = now.year - born.year
    if (now.month, now.day, now.time()) < (born.month, born.day, born.time()):
        years -= 1
    return years


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _make_user(seed: str, position: int, pool: tuple[str, ...], now: datetime) -> dict[str, Any]:
    digest = hashlib.blake2b(
        f"{position}:{seed}".encode(errors="surrogatepass"), digest_size=32
    ).digest()
    # Float draws (rand() * n) instead of choice()/randint(): fewer calls; the bias is irrelevant.
    rand = random.Random(int.from_bytes(digest[16:])).random

    def pick(items: Sequence[_T]) -> _T:
        return items[int(rand() * len(items))]

    def between(low: int, high: int) -> int:
        return low + int(rand() * (high - low + 1))

    nat = pick(pool)
    data = _NATS[nat]
    male = rand() < 0.5
    first = pick(data.male if male else data.female)
    last = pick(data.last)
    title = pick(data.titles[0] if male else data.titles[1])
    if isinstance(data.postcode[0], int):
        low, high = data.postcode
        assert isinstance(low, int) and isinstance(high, int)
        postcode: int | str = between(low, high)
    else:
        postcode = _render(pick(data.postcode), rand)
    offset, description = pick(_TIMEZONES)
    location = {
        "street": {"number": between(1, 9999), "name": pick(data.streets)},
        "city": pick(data.cities),
        "state": pick(data.states),
        "country": data.country,
        "postcode": postcode,
        "coordinates": {
            "latitude": f"{rand() * 180 - 90:.4f}",
            "longitude": f"{rand() * 360 - 180:.4f}",
        },
        "timezone": {"offset": offset, "description": description},
    }
    password = pick(_PASSWORDS)
    salt = "".join([_ALNUM[int(rand() * 62)] for _ in range(8)])
    salted = (password + salt).encode()
    login = {
        "uuid": str(uuid.UUID(bytes=digest[:16], version=4)),
        "username": f"{pick(_USER1)}{pick(_USER2)}{between(100, 999)}",
        "password": password,
        "salt": salt,
        "md5": hashlib.md5(salted).hexdigest(),
        "sha1": hashlib.sha1(salted).hexdigest(),
        "sha256": hashlib.sha256(salted).hexdigest(),
    }
    born, born_text = _date(between(*_DOB_RANGE_MS))
    registered, registered_text = _date(between(*_REGISTERED_RANGE_MS))
    id_value = None
    if data.id_value is not None:
        id_value = _render(data.id_value, rand)
        if "{" in id_value:
            id_value = id_value.format(**_derived_fields(between, born, male, last))
    picture = f"{'men' if male else 'women'}/{between(0, 99 if male else 96)}.jpg"
    return {
        "gender": "male" if male else "female",
        "name": {"title": title, "first": first, "last": last},
        "location": location,
        "email": f"{_ASCII[first]}.{_ASCII[last]}@example.com",
        "login": login,
        "dob": {"date": born_text, "age": _age(born, now)},
        "registered": {"date": registered_text, "age": _age(registered, now)},
        "phone": _render(data.phone, rand),
        "cell": _render(data.cell, rand),
        "id": {"name": data.id_name, "value": id_value},
        "picture": {
            "large": f"{_PICTURE_BASE}{picture}",
            "medium": f"{_PICTURE_BASE}med/{picture}",
            "thumbnail": f"{_PICTURE_BASE}thumb/{picture}",
        },
        "nat": nat,
    }


def _derived_fields(
    between: Callable[[int, int], int], born: datetime, male: bool, last: str
) -> dict[str, str]:
    """Values national id formats take from the person (DE SVNR, DK CPR, FI HETU, ...)."""
    yy = f"{born.year % 100:02d}"
    return {
        "ddmmyy": f"{born.day:02d}{born.month:02d}{yy}",
        "yy": yy,
        "mm": f"{born.month:02d}",
        "initial": _ASCII[last][:1].upper(),
        "svnr_sex": f"{between(0, 49) if male else between(50, 99):02d}",
        "hetu_century": "-" if born.year < 2000 else "A",
        "insee_sex": "1" if male else "2",
    }


def synthetic_user(
    seed: str, position: int, nats: Sequence[str] = (), *, now: datetime | None = None
) -> dict[str, Any]:
    """The user at stream `position` (>= 1) for `seed`: deterministic in (seed, position, nats);
    `now` (UTC, default current time) only feeds the dob/registered `age` fields, as the real API
    computes them against now."""
    if position < 1:
        raise ValueError(f"position must be >= 1, got {position}")
    return _make_user(seed, position, _pool(nats), _now(now))


def synthetic_page(
    seed: str, page: int, results: int, nats: Sequence[str] = (), *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """API page semantics: the users at positions (page-1)*results+1 .. page*results."""
    if page < 1 or results < 0:
        raise ValueError(f"need page >= 1 and results >= 0, got page={page} results={results}")
    pool, when = _pool(nats), _now(now)
    first = (page - 1) * results + 1
    return [_make_user(seed, p, pool, when) for p in range(first, first + results)]


_encode = msgspec.json.Encoder().encode


def prepare_page(request: PageRequest) -> PreparedPage:
    """The users `request` names, selected, validated (`records.parse_user`) and encoded:
    what the child process of `pagegen` sends, and the event loop makes for small pages."""
    pool, fields, keep = _pool(request.nats), request.fields, request.keep_credentials
    users: list[msgspec.Raw] = []
    rejected: dict[int, str] = {}
    for position in range(request.start, request.start + request.count):
        user = select(_make_user(request.seed, position, pool, request.now), fields)
        try:
            parse_user(user)
        except InvalidRecord as exc:  # (a generator bug: the dead letters will show it)
            rejected[len(users)] = str(exc)
        else:
            user = user if keep else scrub(user)
        users.append(msgspec.Raw(_encode(user)))
    return PreparedPage(users, rejected)


GENERATE_CHUNK = 128  # users generated between two yields to the event loop
OFFLOAD_MIN_USERS = 1000  # a page this big is prepared in a child process, and so is
OFFLOAD_MIN_PER_S = 200.0  # any page while pages are asked for at this many users a second


class SyntheticSource:
    """A replayable cursor over synthetic users: no network, the same users for the same seed.

    `inc`/`exc` select fields as they do for the API (`fields.select`), ``login`` always
    kept. `fetch` returns the users as dicts; `fetch_prepared` (what the producer uses)
    validated and encoded, in a child process for a fast stream (see the module docstring;
    `offload` True or False decides instead), which `release` stops. In the event loop, a
    page is generated in chunks of `GENERATE_CHUNK` users with a checkpoint between them,
    so that a big page does not hold up the loop."""

    name = "synthetic"

    def __init__(
        self,
        seed: str = "userstreamd",
        nats: Sequence[str] = (),
        *,
        inc: Sequence[str] = (),
        exc: Sequence[str] = (),
        offload: bool | None = None,
    ) -> None:
        self.seed = seed
        self.nats = _pool(nats)
        self.fields = selected(*keyed_selection(inc, exc))
        self.offload = offload
        self.generator = PageGenerator()
        self._asked_at = -math.inf  # when fetch_prepared was last called
        self._interval_s = math.inf  # between the two calls before

    def __repr__(self) -> str:
        return f"SyntheticSource(seed={self.seed!r}, nats={self.nats!r})"

    async def ready_in_s(self) -> float:
        return 0.0

    async def fetch(self, start: int, count: int) -> list[dict[str, Any]]:
        """The users at positions start .. start+count-1."""
        _check(start, count)
        now = datetime.now(UTC)
        users: list[dict[str, Any]] = []
        await trio.lowlevel.checkpoint()
        for chunk in range(start, start + count, GENERATE_CHUNK):
            users += [
                select(_make_user(self.seed, p, self.nats, now), self.fields)
                for p in range(chunk, min(chunk + GENERATE_CHUNK, start + count))
            ]
            await trio.lowlevel.checkpoint()
        return users

    async def fetch_prepared(
        self, start: int, count: int, *, keep_credentials: bool, now: datetime | None = None
    ) -> PreparedPage:
        """The users at positions start .. start+count-1, validated and encoded (with the
        API's fake credentials only if `keep_credentials`); `now` as for `synthetic_user`."""
        _check(start, count)
        request = PageRequest(
            seed=self.seed,
            nats=self.nats,
            fields=self.fields,
            start=start,
            count=count,
            now=_now(now),
            keep_credentials=keep_credentials,
        )
        if self._offloaded(count):
            return await self.generator.prepare(request)
        users: list[msgspec.Raw] = []
        rejected: dict[int, str] = {}
        await trio.lowlevel.checkpoint()
        for chunk in range(start, start + count, GENERATE_CHUNK):
            size = min(GENERATE_CHUNK, start + count - chunk)
            part = prepare_page(msgspec.structs.replace(request, start=chunk, count=size))
            rejected.update((len(users) + index, why) for index, why in part.rejected.items())
            users += part.users
            await trio.lowlevel.checkpoint()
        return PreparedPage(users, rejected)

    async def release(self) -> None:
        """Stop the child process, if one runs (the next big page starts another)."""
        await self.generator.release()

    def _offloaded(self, count: int) -> bool:
        """Whether this page goes to the child process. The time between two pages asked
        for tells the rate; the longer of the last two, since the producer asks for its
        first two pages at once (it works one page ahead)."""
        now = trio.current_time()
        interval_s = now - self._asked_at
        slowest_s = max(interval_s, self._interval_s)
        self._asked_at, self._interval_s = now, interval_s
        if self.offload is not None:
            return self.offload
        return count >= OFFLOAD_MIN_USERS or count >= OFFLOAD_MIN_PER_S * slowest_s


def _check(start: int, count: int) -> None:
    if start < 1 or count < 0:
        raise ValueError(f"need start >= 1 and count >= 0, got start={start} count={count}")
