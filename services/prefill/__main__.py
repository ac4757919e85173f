"""``python -m services.prefill`` — run one prefill instance (config from ``EPD_*``)."""

from epd import config
from epd.service import run_main, setup_logging


def main() -> None:
    cfg = config.load(config.PrefillConfig)
    setup_logging(cfg.log_level, "prefill")
    from services.prefill.proc import PrefillProc  # after config: heavy imports

    PrefillProc(cfg).serve()


if __name__ == "__main__":
    run_main(main)
