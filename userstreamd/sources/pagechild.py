"""The page generator's child process (``python -m userstreamd.sources.pagechild``,
started by `pagegen.PageGenerator`): answers page requests on standard input until it
ends (the lifeline). Its own module, so that the parent's side never imports the
generator and the two do not import each other."""

from __future__ import annotations

import os
import sys

import msgspec

from .pagegen import LENGTH_BYTES, PageRequest, encode_page
from .synthetic import prepare_page


def main() -> int:
    """The child: answer requests until the end of standard input (the lifeline)."""
    decode_request = msgspec.json.Decoder(PageRequest).decode
    out = sys.stdout.buffer
    try:
        for line in sys.stdin.buffer:
            page = encode_page(prepare_page(decode_request(line)))
            out.write(len(page).to_bytes(LENGTH_BYTES, "big"))
            out.write(page)
            out.flush()
    except BrokenPipeError:  # the daemon is gone: so are we (quietly, at exit too)
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
