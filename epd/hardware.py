"""What this machine's hardware can run fast, read without importing torch (the launcher uses it).

``EPD_DTYPE=auto`` resolves here: bfloat16 where matmuls run natively in bf16, float32 elsewhere.
"""

from __future__ import annotations

import functools

#: Dtype names ``EPD_DTYPE`` accepts besides ``auto`` (``epd.device.DTYPES`` maps them to torch).
DTYPE_NAMES = ("float32", "bfloat16", "float16")

#: CPU flags (``/proc/cpuinfo``) whose presence makes bfloat16 GEMMs run natively: Intel AMX
#: tiles (``amx_bf16``) or AVX-512 BF16 dot products (``avx512_bf16``, also on AMD Zen 4+).
#: Without either, oneDNN emulates bf16 and a bf16 matmul is slower than float32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The :data:`BF16_CPU_FLAGS` this machine's CPU reports (empty off Linux or without them)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in BF16_CPU_FLAGS if flag in have)
    except OSError:
        pass
    return ()


def resolve_dtype(name: str, device: str = "cpu") -> tuple[str, str]:
    """Turn ``EPD_DTYPE`` into the dtype a process runs, with the reason to log.

    ``auto`` picks ``bfloat16`` on ``cuda``/``npu`` and on a CPU with native bf16 GEMMs
    (:data:`BF16_CPU_FLAGS`; vLLM's CPU backend makes the same choice), else ``float32``.
    An explicit name is kept as is; ``bfloat16`` on a CPU without those flags works (oneDNN
    emulates it) but runs slower than float32, which the reason says.

    Args:
        name: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        device: ``EPD_DEVICE`` (``cpu``, ``cuda[:N]``, ``npu[:N]``).

    Returns:
        ``(dtype name, reason)``, e.g. ``("bfloat16", "EPD_DTYPE=auto: CPU has avx512_bf16")``.

    Raises:
        ValueError: an unknown name (the message lists the allowed values).
    """
    allowed = ("auto", *DTYPE_NAMES)
    if name not in allowed:
        raise ValueError(f"{name!r} is not one of {', '.join(allowed)}")
    kind = device.split(":", 1)[0]
    flags = cpu_bf16_flags()
    if name == "auto":
        if kind != "cpu":
            return "bfloat16", f"EPD_DTYPE=auto: {kind} device"
        if flags:
            return "bfloat16", f"EPD_DTYPE=auto: CPU has {'+'.join(flags)}"
        return "float32", f"EPD_DTYPE=auto: CPU has none of {', '.join(BF16_CPU_FLAGS)}"
    if name == "bfloat16" and kind == "cpu" and not flags:
        return name, (f"EPD_DTYPE=bfloat16 on a CPU without {' or '.join(BF16_CPU_FLAGS)}: bf16 is "
                      "emulated and runs slower than float32")
    return name, f"EPD_DTYPE={name}"

