"""``python -m services.encoder`` — run one encoder instance (config from ``EPD_*``)."""

from epd import config
from epd.service import run_main, setup_logging


def main() -> None:
    cfg = config.load(config.EncoderConfig)
    setup_logging(cfg.log_level, "encoder")
    from services.encoder.proc import EncoderProc  # after config: heavy imports

    EncoderProc(cfg).serve()


if __name__ == "__main__":
    run_main(main)
