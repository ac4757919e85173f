"""``python -m services.encoder`` — run one encoder instance (config from ``EPD_*``; see services.host)."""

from epd.service import run_main
from services.host import main

if __name__ == "__main__":
    run_main(lambda: main("encoder"))
