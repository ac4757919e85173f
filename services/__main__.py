"""``python -m services`` — one process hosting the roles in ``EPD_ROLES`` (e.g. ``EP``, ``prefill,decode``)."""

from epd.service import run_main
from services.host import main

if __name__ == "__main__":
    run_main(main)
