// userstreamd's live page: the users as they arrive over the WebSocket, and the pipeline's
// state from /status.json (polled every second).
//
// Every field of every message is treated as hostile: it may be missing, of the wrong type
// or made to look like markup. Record text only ever reaches the page through textContent
// (never innerHTML), and a picture is shown only from https://randomuser.me/.
//
// The stream resumes after a reconnect with ?epoch=E&since=S (S = the last seq shown), so a
// restart of the daemon shows neither a duplicate nor, unless the server says so with a
// "gap" message, a hole. The first connection resumes MAX_ROWS behind the stream's last
// seq (from /status.json), so the page opens with the newest users from the server's
// replay buffer instead of empty, however slow the stream.
"use strict";

(() => {
  const MAX_ROWS = 50; // users kept in the list
  const RATE_WINDOW_MS = 5000; // users per second: arrivals over this window
  const STATUS_INTERVAL_MS = 1000;
  const STATUS_TIMEOUT_MS = 2500;
  const BACKOFF_MIN_S = 0.5; // reconnect delay: doubles from this up to BACKOFF_MAX_S,
  const BACKOFF_MAX_S = 5; // each delay jittered into [d/2, d]
  const STABLE_MS = 5000; // live this long: the next reconnect starts at BACKOFF_MIN_S
  const TOP_COUNTRIES = 10;
  const TOP_GENDERS = 5;
  const MAX_KEYS = 1000; // countries (or genders) counted apart; the rest are "(other)"
  const MAX_NOTICES = 6;
  const MAX_TEXT = 200; // characters kept of any one text field
  const EPOCH = /^[A-Za-z0-9_.-]{1,64}$/; // what the server accepts back in ?epoch=
  const PICTURE_PREFIX = "https://randomuser.me/";
  const HUES = 12; // avatar colour classes hue-0 .. hue-11 in live.css

  const $ = (id) => document.getElementById(id);
  const el = {
    connection: $("connection"),
    rate: $("rate"),
    total: $("total"),
    clients: $("clients"),
    clientsDetail: $("clients-detail"),
    state: $("state"),
    stateDetail: $("state-detail"),
    users: $("users"),
    usersEmpty: $("users-empty"),
    countries: $("countries"),
    genders: $("genders"),
    stream: $("stream"),
    components: $("components"),
    notices: $("notices"),
    version: $("version"),
  };
  const token = new URLSearchParams(window.location.search).get("token");
  const numberFormat = new Intl.NumberFormat();

  // -- hostile input, made safe ------------------------------------------------------

  function isObject(value) {
    return value !== null && typeof value === "object" && !Array.isArray(value);
  }

  function obj(value) {
    return isObject(value) ? value : {};
  }

  /** A string or finite number as text (at most MAX_TEXT characters), else "". */
  function text(value) {
    if (typeof value === "string") return value.slice(0, MAX_TEXT);
    if (typeof value === "number" && Number.isFinite(value)) return String(value);
    return "";
  }

  function seqOf(value) {
    return Number.isSafeInteger(value) && value >= 0 ? value : null;
  }

  function epochOf(value) {
    return typeof value === "string" && EPOCH.test(value) ? value : null;
  }

  function pictureOf(user) {
    const thumbnail = obj(user.picture).thumbnail;
    if (typeof thumbnail !== "string" || thumbnail.length > 500) return null;
    if (!thumbnail.startsWith(PICTURE_PREFIX)) return null;
    try {
      const url = new URL(thumbnail);
      return url.origin === "https://randomuser.me" ? url.href : null;
    } catch {
      return null;
    }
  }

  function initialsOf(first, last) {
    const letter = (s) => (Array.from(s.trim())[0] || "").toLocaleUpperCase();
    return letter(first) + letter(last) || "?";
  }

  function hueOf(key) {
    let hash = 0;
    for (let i = 0; i < key.length; i++) hash = (hash * 31 + key.charCodeAt(i)) >>> 0;
    return hash % HUES;
  }

  function format(n) {
    return numberFormat.format(n);
  }

  /** A new element with a class and text; the text goes in as text, never as markup.
   *  `dir` "auto" lets a right-to-left name (Persian, say) read the right way. */
  function make(tag, className, content, dir) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (content !== undefined) node.textContent = content;
    if (dir) node.dir = dir;
    return node;
  }

  // -- what this page has received ----------------------------------------------------

  const stream = {
    epoch: null, // the epoch of lastSeq
    lastSeq: 0, // the last seq shown: anything at or below it in this epoch is dropped
    total: 0,
    duplicates: 0,
    countries: new Map(), // Maps: record text can never collide with a prototype key
    genders: new Map(),
    arrivals: [], // [slot, count] per 100 ms, for the rate
    firstArrival: null,
    filledThrough: 0, // the first connection's replayed seqs (not counted in the rate)
    fillFrom: null, // the first connection's cursor, while its replay may still come
  };
  let pending = []; // users not drawn yet (the newest MAX_ROWS), oldest first
  let drawScheduled = false;

  function adoptEpoch(epoch, lastSeq) {
    if (stream.epoch !== null && stream.epoch !== epoch) {
      notice(`A new stream began (epoch ${epoch}): its seqs start again.`, "warn");
    }
    stream.epoch = epoch;
    stream.lastSeq = lastSeq;
    document.body.dataset.epoch = epoch;
  }

  function onWelcome(message) {
    const epoch = epochOf(message.epoch);
    const seq = seqOf(message.seq);
    if (epoch === null || seq === null) return;
    if (stream.fillFrom !== null && epoch === stream.epoch) stream.filledThrough = seq;
    if (stream.epoch === null) adoptEpoch(epoch, seq);
    else if (epoch !== stream.epoch) adoptEpoch(epoch, 0);
    if (typeof message.server === "string") el.version.textContent = text(message.server);
    connection.onWelcome();
  }

  function onUser(message) {
    const epoch = epochOf(message.epoch);
    const seq = seqOf(message.seq);
    if (epoch === null || seq === null) return;
    if (epoch !== stream.epoch) adoptEpoch(epoch, 0);
    if (seq <= stream.lastSeq) {
      stream.duplicates += 1;
      document.body.dataset.duplicates = String(stream.duplicates);
      return;
    }
    stream.lastSeq = seq;
    const user = obj(message.user);
    const name = obj(user.name);
    const first = text(name.first);
    const last = text(name.last);
    const country = text(obj(user.location).country);
    const gender = text(user.gender);
    const age = seqOf(obj(user.dob).age); // (a non-negative integer, as a seq is)
    const key = text(obj(user.login).uuid) || `${first} ${last}`;
    const row = {
      epoch,
      seq,
      name: `${first} ${last}`.trim() || "(no name)",
      initials: initialsOf(first, last),
      hue: hueOf(key),
      picture: pictureOf(user),
      country: country || "(no country)",
      details: [age === null ? "" : `age ${age}`, gender].filter(Boolean).join(" · "),
      source: text(message.source),
    };

    stream.total += 1;
    count(stream.countries, country || "(unknown)");
    count(stream.genders, gender || "(unknown)");
    if (seq > stream.filledThrough) {
      // (users replayed on opening arrive at once: not a rate)
      const now = Date.now();
      const slot = Math.floor(now / 100);
      const lastSlot = stream.arrivals[stream.arrivals.length - 1];
      if (lastSlot && lastSlot[0] === slot) lastSlot[1] += 1;
      else stream.arrivals.push([slot, 1]);
      if (stream.firstArrival === null) stream.firstArrival = now;
    }

    pending.push(row);
    if (pending.length > MAX_ROWS) pending.shift();
    scheduleDraw();
  }

  function onGap(message) {
    const to = seqOf(message.to_seq);
    const from = seqOf(message.from_seq);
    const reason = text(message.reason);
    const epoch = epochOf(message.epoch);
    if (to === null || epoch === null) return;
    if (epoch !== stream.epoch) adoptEpoch(epoch, 0);
    // The stream continues after to_seq: from_seq null means it did not know where this
    // page stood (another epoch, or ahead of a restarted daemon's history).
    stream.lastSeq = from === null ? to : Math.max(stream.lastSeq, to);
    if (from !== null && stream.fillFrom !== null && from === stream.fillFrom + 1) {
      return; // fewer users to fill the page with than asked for: nothing was missed
    }
    const why = reason ? `: ${reason}` : "";
    const missed =
      from === null
        ? `could not resume where this page stood${why}`
        : `seqs ${from}–${to} will not arrive${why}`;
    notice(`Gap: ${missed}.`, "warn", "gap");
  }

  function count(map, key) {
    // However many different values a stream makes up, the page keeps MAX_KEYS of them.
    const counted = map.has(key) || map.size < MAX_KEYS ? key : "(other)";
    map.set(counted, (map.get(counted) || 0) + 1);
  }

  // -- drawing --------------------------------------------------------------------------

  function scheduleDraw() {
    if (drawScheduled) return;
    drawScheduled = true;
    // At thousands of users a second, the list is redrawn once per frame, not per user.
    window.requestAnimationFrame(draw);
  }

  function draw() {
    drawScheduled = false;
    const rows = pending;
    pending = [];
    const fragment = document.createDocumentFragment();
    for (let i = rows.length - 1; i >= 0; i--) fragment.appendChild(userRow(rows[i]));
    el.users.insertBefore(fragment, el.users.firstChild);
    while (el.users.childElementCount > MAX_ROWS) el.users.lastElementChild.remove();
    el.usersEmpty.hidden = el.users.childElementCount > 0;
    drawFigures();
  }

  function userRow(row) {
    const item = make("li", "user fresh");
    item.dataset.seq = String(row.seq);
    item.dataset.epoch = row.epoch;

    const avatar = make("span", `avatar hue-${row.hue}`);
    avatar.setAttribute("aria-hidden", "true");
    avatar.appendChild(make("span", "initials", row.initials));
    if (row.picture !== null) {
      const img = make("img", "photo");
      img.alt = "";
      img.width = 48;
      img.height = 48;
      img.decoding = "async";
      img.referrerPolicy = "no-referrer";
      img.addEventListener("load", () => avatar.classList.add("has-photo"), { once: true });
      img.addEventListener("error", () => img.remove(), { once: true }); // initials stay
      img.src = row.picture;
      avatar.appendChild(img);
    }

    const who = make("div", "who");
    who.appendChild(make("span", "name", row.name, "auto"));
    const where = make("span", "meta");
    where.appendChild(make("span", "country", row.country, "auto"));
    if (row.details) where.appendChild(make("span", "details", row.details, "auto"));
    who.appendChild(where);

    const seq = make("span", "seq", `#${row.seq}`);
    seq.title = `seq ${row.seq} of epoch ${row.epoch}${row.source ? `, from ${row.source}` : ""}`;

    item.append(avatar, who, seq);
    return item;
  }

  function bars(list, entries, total) {
    const items = entries.map(([label, n]) => {
      const item = make("li", "bar");
      const share = total ? n / total : 0;
      item.appendChild(make("span", "bar-label", label, "auto"));
      item.appendChild(make("span", "bar-count", `${format(n)} · ${Math.round(share * 100)}%`));
      const track = make("span", "bar-track");
      const fill = make("span", "bar-fill");
      fill.style.width = `${(share * 100).toFixed(1)}%`; // (CSSOM: allowed by the CSP)
      track.appendChild(fill);
      item.appendChild(track);
      return item;
    });
    if (items.length === 0) items.push(make("li", "empty", "nothing received yet"));
    list.replaceChildren(...items);
  }

  function rate() {
    const now = Date.now();
    const oldest = Math.floor((now - RATE_WINDOW_MS) / 100);
    while (stream.arrivals.length && stream.arrivals[0][0] <= oldest) stream.arrivals.shift();
    if (stream.firstArrival === null) return 0;
    const arrived = stream.arrivals.reduce((sum, [, n]) => sum + n, 0);
    const span = Math.min(RATE_WINDOW_MS, Math.max(1000, now - stream.firstArrival));
    return (arrived * 1000) / span;
  }

  let shownTotal = -1;
  function drawFigures() {
    const perS = rate();
    el.rate.textContent = perS >= 100 ? format(Math.round(perS)) : perS.toFixed(1);
    if (shownTotal === stream.total) return;
    shownTotal = stream.total;
    el.total.textContent = format(stream.total);
    const countries = [...stream.countries].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    bars(el.countries, countries.slice(0, TOP_COUNTRIES), stream.total);
    const genders = [...stream.genders].sort((a, b) => b[1] - a[1]);
    bars(el.genders, genders.slice(0, TOP_GENDERS), stream.total);
  }

  function notice(message, level = "info", kind = "") {
    const now = new Date();
    const time = make("time", "notice-time", now.toLocaleTimeString());
    time.dateTime = now.toISOString();
    const latest = el.notices.firstElementChild;
    if (latest && latest.dataset.message === message) {
      // The same again (a daemon refusing over and over): one line, counted.
      const repeats = Number(latest.dataset.repeats) + 1;
      latest.dataset.repeats = String(repeats);
      latest.querySelector(".notice-time").replaceWith(time);
      latest.querySelector(".notice-count").textContent = ` ×${repeats}`;
      return;
    }
    const item = make("li", `notice ${level}`);
    item.dataset.kind = kind;
    item.dataset.message = message;
    item.dataset.repeats = "1";
    const line = make("span", "notice-text", message);
    line.appendChild(make("span", "notice-count"));
    item.append(time, " ", line);
    el.notices.insertBefore(item, el.notices.firstChild);
    while (el.notices.childElementCount > MAX_NOTICES) el.notices.lastElementChild.remove();
  }

  // -- /status.json ---------------------------------------------------------------------

  const status = {
    latest: null, // the last answer, or null while none
    failing: false,
    inFlight: null,
  };

  /** The status now (one request at a time, bounded); null when it cannot be had. */
  function fetchStatus() {
    if (status.inFlight) return status.inFlight;
    const abort = new AbortController();
    const timer = window.setTimeout(() => abort.abort(), STATUS_TIMEOUT_MS);
    status.inFlight = fetch("/status.json", {
      cache: "no-store",
      credentials: "same-origin",
      signal: abort.signal,
    })
      .then((response) => (response.ok ? response.json() : Promise.reject(response.status)))
      .then((body) => {
        status.latest = obj(body);
        status.failing = false;
        drawStatus();
        return status.latest;
      })
      .catch(() => {
        status.failing = true;
        drawStatus();
        return null;
      })
      .finally(() => {
        window.clearTimeout(timer);
        status.inFlight = null;
      });
    return status.inFlight;
  }

  function drawStatus() {
    const s = status.latest;
    document.body.classList.toggle("status-stale", status.failing);
    if (s === null || status.failing) {
      el.state.textContent = "unknown";
      el.state.dataset.ready = "unknown";
      el.stateDetail.textContent = "status unavailable: is the daemon running?";
      if (s === null) return;
    }
    const checks = Object.entries(obj(s.checks));
    const failing = checks.filter(([, v]) => v !== "ok");
    if (!status.failing) {
      const ready = s.ready === true && failing.length === 0;
      el.state.textContent = ready ? "ready" : "not ready";
      el.state.dataset.ready = String(ready);
      el.stateDetail.textContent = ready
        ? `all ${checks.length} checks pass`
        : failing.map(([k, v]) => `${text(k)}: ${text(v) || "failing"}`).join("; ") ||
          "not ready";
    }

    const clients = obj(s.clients);
    const plain = seqOf(clients.plain);
    const member = seqOf(clients.member);
    el.clients.textContent = plain === null ? "–" : format(plain);
    const viewers = plain === 1 ? "viewer" : "viewers";
    const members = member === 1 ? "group member" : "group members";
    el.clientsDetail.textContent =
      `${viewers} of the plain stream` +
      (member === null ? "" : ` · ${format(member)} ${members} (consumers)`);

    const st = obj(s.stream);
    const facts = [
      ["source", text(st.source) || "–"],
      ["epoch", text(st.epoch) || "–"],
      ["last seq", seqOf(st.last_seq) === null ? "–" : format(st.last_seq)],
      ["committed since start", seqOf(st.committed) === null ? "–" : format(st.committed)],
      [
        "committed through seq",
        seqOf(st.committed_through) === null ? "–" : format(st.committed_through),
      ],
      ["target rate", typeof st.rate_per_s === "number" ? `${text(st.rate_per_s)}/s` : "–"],
      ["version", text(s.version) || "–"],
    ];
    el.stream.replaceChildren(
      ...facts.flatMap(([k, v]) => [make("dt", "", k), make("dd", "", v)]),
    );

    const components = Object.entries(obj(s.components)).map(([name, state]) => {
      const value = text(state) || "unknown";
      const item = make("li", `component ${value === "running" ? "ok" : "warn"}`);
      item.append(
        make("span", "component-name", text(name)),
        make("span", "component-state", value),
      );
      return item;
    });
    el.components.replaceChildren(...components);
  }

  // -- the WebSocket, resumed after every close -------------------------------------------

  const connection = {
    ws: null,
    attempt: 0, // reconnects since the last stable connection
    everLive: false,
    liveSince: 0,
    timer: null,
    countdown: null,
    tokenHinted: false,

    show(state, message) {
      el.connection.dataset.state = state;
      el.connection.textContent = message;
    },

    async connect() {
      this.timer = null;
      const word = this.everLive ? "reconnecting" : "connecting";
      this.show(word, `${word}…`);
      const s = await fetchStatus();
      const ws = obj(s && s.websocket);
      const port = seqOf(ws.port);
      if (port === null || port === 0 || port > 65535) {
        this.retry(s === null ? "status unavailable" : "stream not listening yet");
        return;
      }
      if (ws.token_required === true && !token && !this.tokenHinted) {
        this.tokenHinted = true;
        notice("The stream needs a token: open this page as /?token=YOUR_TOKEN.", "warn");
      }
      const scheme = ws.scheme === "wss" ? "wss" : "ws";
      const query = new URLSearchParams();
      if (stream.lastSeq !== stream.fillFrom) stream.fillFrom = null; // (filled, or moved on)
      const st = obj(s.stream);
      const latest = seqOf(st.last_seq);
      if (stream.epoch === null && epochOf(st.epoch) !== null && latest !== null) {
        // Opening: resume MAX_ROWS behind the last seq, to show the newest users at once.
        adoptEpoch(st.epoch, Math.max(0, latest - MAX_ROWS));
        stream.fillFrom = stream.lastSeq;
      }
      if (stream.epoch !== null) {
        query.set("epoch", stream.epoch);
        query.set("since", String(stream.lastSeq));
      }
      if (token) query.set("token", token);
      const search = query.toString();
      const url = `${scheme}://${window.location.hostname}:${port}/${search ? `?${search}` : ""}`;
      let socket;
      try {
        socket = new WebSocket(url);
      } catch {
        this.retry("could not open the stream");
        return;
      }
      this.ws = socket;
      socket.addEventListener("message", (event) => {
        if (socket === this.ws) receive(event.data);
      });
      socket.addEventListener("close", (event) => {
        if (socket !== this.ws) return;
        this.ws = null;
        const wasLive = this.liveSince > 0;
        if (wasLive && Date.now() - this.liveSince >= STABLE_MS) this.attempt = 0;
        this.liveSince = 0;
        if (wasLive) {
          const reason = event.reason ? `: ${text(event.reason)}` : "";
          const why = event.code === 1006 ? "connection lost" : `closed (${event.code}${reason})`;
          notice(`Stream ${why}; resuming after seq ${stream.lastSeq}.`, "info");
        }
        this.retry(wasLive ? "disconnected" : "could not connect");
      });
    },

    onWelcome() {
      this.everLive = true;
      this.liveSince = Date.now();
      const epoch = stream.epoch ? ` · epoch ${stream.epoch}` : "";
      this.show("live", `live${epoch}`);
    },

    retry(why) {
      const ceiling = Math.min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** this.attempt);
      this.attempt += 1;
      const delayMs = ceiling * (0.5 + Math.random() / 2) * 1000;
      const due = Date.now() + delayMs;
      const word = this.everLive ? "reconnecting" : "connecting";
      const tick = () => {
        const left = Math.max(0, (due - Date.now()) / 1000);
        this.show(word, `${why}: ${word} in ${left.toFixed(1)} s`);
      };
      tick();
      window.clearInterval(this.countdown);
      this.countdown = window.setInterval(tick, 100);
      this.timer = window.setTimeout(() => {
        window.clearInterval(this.countdown);
        this.connect();
      }, delayMs);
    },
  };

  function receive(data) {
    if (typeof data !== "string") return; // the protocol is text frames only
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (!isObject(message)) return;
    switch (message.type) {
      case "welcome":
        onWelcome(message);
        break;
      case "user":
        onUser(message);
        break;
      case "gap":
        onGap(message);
        break;
      default: // checkpoint, and anything a newer server sends
        break;
    }
  }

  // -- start ---------------------------------------------------------------------------------

  el.usersEmpty.hidden = false;
  drawFigures();
  window.setInterval(drawFigures, 500);
  window.setInterval(() => {
    if (!status.inFlight) fetchStatus();
  }, STATUS_INTERVAL_MS);
  connection.connect();
})();
