"""Which precision the encoder runs in: ``train.mixed_precision`` resolved for this device.

Only the encoder's convolutions and normalisations run in the reduced precision (under
autocast); the methods upcast the embeddings and keep the classifier, the hypernetwork, the
softmax and the losses in fp32 (see :meth:`hmaml.methods.Method.forward`). bf16 keeps 8
significant bits: at the update norms of the paper's Table 3 (‖ΔW‖ ≈ 100) logits computed in
bf16 would resolve only about 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU flags of native bf16 arithmetic (x86): with them oneDNN's bf16 kernels beat fp32.
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` (no, bf16, fp16) and why it was chosen."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of the encoder; None for fp32."""
        return _DTYPES[self.name]

    @property
    def label(self) -> str:
        """The name benchmarks print: fp32, bf16 or fp16."""
        return "fp32" if self.name == "no" else self.name

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The native-bf16 instruction sets this CPU lists (empty where it lists none or no
    /proc/cpuinfo exists, e.g. on macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in _BF16_CPU_FLAGS if flag in flags]


def resolve_precision(mode: str, device: torch.device,
                      cpuinfo: Path = Path("/proc/cpuinfo"), *, compiled: bool = False
                      ) -> Precision:
    """``mode`` (a ``train.mixed_precision`` value) for ``device``, the method compiled
    (``train.compile``) or not; ``auto`` says what it found.

    On CUDA, ``auto`` is bf16 only under ``train.compile`` (CUDA graphs): an eager step of
    few-shot tasks is bound by kernel launches, not arithmetic, and the bf16 encoder adds a cast
    per weight and activation (+10 % kernels per step). Measured on H100s (docs/benchmarks.md:
    The GPU check): eager bf16 1,378 and 2,370 tasks/s against fp32 1,943 and 1,949 on two machines,
    adaptation no faster at 28 or 84 px; compiled with CUDA graphs bf16 4,903 against 2,239.
    """
    if mode != "auto":
        return Precision(mode, "train.mixed_precision")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return Precision("no", f"auto: CUDA compute capability {major}.{minor} < 8.0")
        if not compiled:
            return Precision("no", "auto: fp32 on CUDA without train.compile (eager steps are "
                                   "bound by kernel launches; bf16 adds casts and was slower)")
        return Precision("bf16", f"auto: CUDA compute capability {major}.{minor} >= 8.0 and "
                                 "train.compile (CUDA graphs)")
    if device.type == "cpu":
        flags = cpu_bf16_flags(cpuinfo)
        if flags:
            return Precision("bf16", f"auto: CPU has {'/'.join(flags)}")
        return Precision("no", "auto: CPU has no native bf16 (amx_bf16/avx512_bf16)")
    return Precision("no", f"auto: fp32 on {device.type}")
