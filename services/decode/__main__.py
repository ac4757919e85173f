"""``python -m services.decode`` — run one decode instance (config from ``EPD_*``)."""

from epd import config
from epd.service import run_main, setup_logging


def main() -> None:
    cfg = config.load(config.DecodeConfig)
    setup_logging(cfg.log_level, "decode")
    from services.decode.proc import DecodeProc  # after config: heavy imports

    DecodeProc(cfg).serve()


if __name__ == "__main__":
    run_main(main)
