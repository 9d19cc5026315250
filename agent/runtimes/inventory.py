"""The device's hardware inventory, read from the operating system alone.

What is detected, and from where (all paths are read under ``root``, ``/`` on a real device):

==================  =========================================================================
CPU                 ``/proc/cpuinfo``: ``model name`` (x86), ``Model``/``Hardware`` (ARM), else
                    ``/proc/device-tree/model``; the ``flags`` (x86) or ``Features`` (ARM) lines,
                    reduced to the ISA extensions that matter for inference (AVX-512, AMX, VNNI,
                    BF16/FP16, NEON, SVE, I8MM, ...) and intersected over all logical CPUs.
nvidia-gpu          ``/proc/driver/nvidia/gpus/*/information`` (its ``Model:`` line), PCI devices of
                    vendor ``0x10de`` with display class ``0x03xxxx``, else ``/dev/nvidiaN``.
nvidia-jetson       ``/etc/nv_tegra_release`` (the L4T release), ``/proc/device-tree/model`` naming
                    Jetson/NVIDIA, or a ``nvidia,tegra*`` device-tree ``compatible`` entry.
intel-gpu, amd-gpu  ``/sys/class/drm/cardN/device/vendor`` ``0x8086``/``0x1002``, when a render
                    node ``/dev/dri/renderD*`` exists (without one, nothing can compute on it).
intel-npu           ``/dev/accel/accelN`` whose ``/sys/class/accel/accelN/device/vendor`` is
                    ``0x8086`` (driver ``intel_vpu``); other ``/dev/accel`` devices are reported as
                    ``generic-accel``.
coral-edgetpu       PCIe: ``/dev/apex_N`` or PCI ``1ac1:089a``; USB: ``/sys/bus/usb/devices/*``
                    with ``idVendor:idProduct`` ``1a6e:089a`` (before the runtime loads its
                    firmware) or ``18d1:9302`` (after).
hailo               ``/dev/hailoN`` or PCI vendor ``0x1e60`` (device ``0x2864``: Hailo-8).
rockchip-npu        a device-tree ``compatible`` entry ``rockchip,rk3588``/``rk3588s``/``rk3576``/
                    ``rk3568``/``rk3566`` *and* an NPU trace: ``/sys/kernel/debug/rknpu``,
                    ``/dev/rknpu``, ``/sys/class/devfreq/*npu*`` or an ``rknpu``/``rocket`` driver
                    under ``/sys/bus/platform/drivers/``.
raspberry-pi        ``/proc/device-tree/model`` starting with ``Raspberry Pi``.
==================  =========================================================================

Why no vendor SDK: every one of these devices is announced by the kernel before any vendor
library is involved — PCI/USB ids in sysfs, device nodes in ``/dev``, the device tree on boards.
Asking the kernel works on a device whose runtimes are not installed yet (which is exactly when the
fleet needs to know what to install), costs a few file reads instead of importing CUDA or
OpenVINO, and cannot hang or crash the agent. The runtime backends report what *they* can use
(``with_runtime_devices``); this module only merges their lists in.

Every read is defensive: a missing, unreadable or oddly shaped file (a directory where a file is
expected, bytes that are not UTF-8, a FIFO) is skipped, never raised, because the agent has to
start on any box. When ``root`` is a fake tree, a symlink that leads outside it is not followed.

Example::

    from agent.runtimes.inventory import scan

    inventory = scan()
    inventory.hardware_class()   # e.g. "x86_64-avx2+intel-gpu+intel-npu"
    inventory.fingerprint()      # e.g. "3f1c0b9a27d4e6f0"
    inventory = inventory.with_runtime_devices("openvino", ["CPU", "GPU", "NPU"])
    inventory.to_dict()          # JSON-friendly, for the device's status report
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "ACCELERATOR_KINDS",
    "ARM_FLAGS",
    "HOST_ROOT",
    "X86_FLAGS",
    "Accelerator",
    "CpuInfo",
    "Inventory",
    "detect_accelerators",
    "normalise_arch",
    "scan",
    "scan_cpu",
]

logger = logging.getLogger(__name__)

HOST_ROOT = Path("/")

ACCELERATOR_KINDS = frozenset(
    {
        "nvidia-gpu",
        "nvidia-jetson",
        "intel-gpu",
        "intel-npu",
        "amd-gpu",
        "coral-edgetpu",
        "hailo",
        "rockchip-npu",
        "raspberry-pi",
        "generic-accel",
    }
)

#: x86 ISA extensions worth knowing for inference (names as in /proc/cpuinfo ``flags``).
X86_FLAGS = frozenset(
    {
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_bf16",
        "avx512_vnni",
        "avx512_fp16",
        "avx_vnni",
        "amx_bf16",
        "amx_fp16",
        "amx_int8",
        "amx_tile",
    }
)
#: ARM ISA extensions worth knowing (names as in /proc/cpuinfo ``Features``): NEON (asimd), dot
#: product (asimddp), FP16 arithmetic (asimdhp/fphp), BF16, int8 matrix multiply (i8mm), SVE.
ARM_FLAGS = frozenset({"asimd", "asimddp", "asimdhp", "fphp", "bf16", "i8mm", "sve", "sve2"})
_INTERESTING_FLAGS = X86_FLAGS | ARM_FLAGS
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# f16c only converts; these compute in FP16.
_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp", "fphp"})
_AMX_FLAGS = frozenset({"amx_tile", "amx_bf16", "amx_int8", "amx_fp16"})

_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "x64": "x86_64",
    "em64t": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv8": "aarch64",
    "armv8l": "aarch64",
    "aarch64_be": "aarch64",
}

_SMALL_FILE = 64 * 1024
_CPUINFO_MAX = 8 * 1024 * 1024  # a few hundred logical CPUs of ~1.5 KB each
_UNKNOWN = "unknown"


def normalise_arch(machine: str) -> str:
    """Map ``platform.machine()`` spellings to ``"x86_64"`` or ``"aarch64"``.

    Anything else (``armv7l``, ``riscv64``, ...) is returned lower-cased, unchanged otherwise, so
    an unexpected box still gets an inventory.
    """
    key = machine.strip().lower()
    return _ARCH_ALIASES.get(key, key or _UNKNOWN)


# --------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as the OS reports it: normalised arch, model string, usable cores, ISA flags."""

    arch: str
    model: str
    cores: int
    flags: frozenset[str] = frozenset()

    @property
    def supports_bf16(self) -> bool:
        """Native BF16 arithmetic: AVX512_BF16 or AMX-BF16 on x86, the BF16 extension on ARM."""
        return bool(self.flags & _BF16_FLAGS)

    @property
    def supports_fp16(self) -> bool:
        """Native FP16 arithmetic: asimdhp/fphp on ARM, AVX512-FP16/AMX-FP16 on x86.

        F16C is not enough: it only converts between FP16 and FP32.
        """
        return bool(self.flags & _FP16_FLAGS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "model": self.model,
            "cores": self.cores,
            "flags": sorted(self.flags),
            "supports_bf16": self.supports_bf16,
            "supports_fp16": self.supports_fp16,
        }


@dataclass(frozen=True)
class Accelerator:
    """One accelerator (or board) the OS revealed.

    ``evidence`` holds the device-side paths or ids that revealed it (for humans; it is not part of
    the fingerprint). ``details`` holds hashable ``(key, value)`` string pairs, kept sorted by key,
    that identify the hardware (PCI ids, SoC, L4T release, ...); they *are* fingerprinted, so
    nothing that changes on reboot belongs there.
    """

    kind: str
    name: str
    evidence: tuple[str, ...] = ()
    details: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ACCELERATOR_KINDS:
            raise ValueError(f"unknown accelerator kind {self.kind!r}")
        object.__setattr__(self, "evidence", tuple(dict.fromkeys(self.evidence)))
        object.__setattr__(self, "details", tuple(sorted(dict(self.details).items())))

    def detail(self, key: str) -> str | None:
        """The value of one detail, or None."""
        return dict(self.details).get(key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "evidence": list(self.evidence),
            "details": dict(self.details),
        }


def _accel(kind: str, name: str, evidence: Iterable[str], **details: str | None) -> Accelerator:
    return Accelerator(
        kind=kind,
        name=name,
        evidence=tuple(evidence),
        details=tuple((k, v) for k, v in details.items() if v),
    )


# Short tags for hardware_class(); board-type kinds are rendered as a board token instead.
_ACCEL_TAGS: Mapping[str, str] = {
    "nvidia-gpu": "nvidia-gpu",
    "intel-gpu": "intel-gpu",
    "intel-npu": "intel-npu",
    "amd-gpu": "amd-gpu",
    "coral-edgetpu": "coral",
    "hailo": "hailo",
    "generic-accel": "accel",
}


@dataclass(frozen=True)
class Inventory:
    """Everything the agent reports about the device's hardware."""

    cpu: CpuInfo
    accelerators: tuple[Accelerator, ...] = ()
    runtime_devices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    os_release: str | None = None
    kernel: str | None = None

    def kinds(self) -> set[str]:
        """The accelerator kinds present."""
        return {a.kind for a in self.accelerators}

    def with_runtime_devices(self, name: str, devices: Iterable[str]) -> Inventory:
        """A copy with ``name``'s device list set (replacing an earlier one of the same runtime).

        The runtime's own order is kept (it may be a priority order); runtimes are kept sorted.
        """
        listed = tuple(dict.fromkeys(str(d) for d in devices))
        others = [(n, d) for n, d in self.runtime_devices if n != name]
        return replace(self, runtime_devices=tuple(sorted([*others, (name, listed)])))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict, including the fingerprint and hardware class."""
        return {
            "cpu": self.cpu.to_dict(),
            "accelerators": [a.to_dict() for a in self.accelerators],
            "runtime_devices": {n: list(d) for n, d in self.runtime_devices},
            "os_release": self.os_release,
            "kernel": self.kernel,
            "hardware_class": self.hardware_class(),
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over what identifies this hardware/runtime configuration.

        Covered: the arch, CPU model, ISA flags, each accelerator's kind, name and details, and
        the runtime device lists — all sorted, canonically JSON-encoded. Not covered: core count
        (affinity and cgroups vary), evidence paths (device numbering varies between boots), OS
        release and kernel.
        """
        doc = {
            "arch": self.cpu.arch,
            "cpu_model": self.cpu.model,
            "flags": sorted(self.cpu.flags),
            "accelerators": sorted(
                [a.kind, a.name, [list(kv) for kv in a.details]] for a in self.accelerators
            ),
            "runtime_devices": sorted([n, sorted(d)] for n, d in self.runtime_devices),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def hardware_class(self) -> str:
        """A short slug to group a fleet by: ``<arch>-<platform>[+<accelerator>...]``.

        The rule, applied in order:

        1. Start with the normalised arch (``x86_64``, ``aarch64``, or whatever else it is).
        2. Platform token: a known board wins — ``jetson-<family>`` (``orin``, ``xavier``, ``nano``,
           ``tx2``, ``thor``; plain ``jetson`` if unknown), ``rpi<N>`` / ``rpi-<variant>`` for a
           Raspberry Pi (``rpi5``, ``rpi400``, ``rpi-cm4``, ``rpi-zero-2-w``), or the Rockchip SoC
           (``rk3588``). Without a board, the CPU tier: on x86_64 ``avx512`` (avx512f) >
           ``avx2`` > ``sse4`` > ``base``; on aarch64 ``sve2`` > ``sve`` > ``neon`` > ``base``;
           then ``-bf16`` when the CPU computes in BF16, then (x86) ``-amx`` when it has AMX.
           Other arches get no platform token.
        3. Then ``+<tag>`` for each other accelerator kind present, tags sorted and de-duplicated:
           ``nvidia-gpu``, ``intel-gpu``, ``intel-npu``, ``amd-gpu``, ``coral``, ``hailo``,
           ``accel``.

        Examples: ``x86_64-avx512-bf16-amx``, ``x86_64-avx2``, ``x86_64-avx2+intel-gpu``,
        ``x86_64-avx2+coral``, ``aarch64-rpi5+coral``, ``aarch64-jetson-orin``,
        ``aarch64-rk3588``, ``aarch64-sve-bf16``.
        """
        parts = [self.cpu.arch]
        board = self._board_token()
        tier = board or _cpu_tier(self.cpu)
        if tier:
            parts.append(tier)
        slug = "-".join(parts)
        tags = sorted({_ACCEL_TAGS[a.kind] for a in self.accelerators if a.kind in _ACCEL_TAGS})
        return "+".join([slug, *tags])

    def _board_token(self) -> str | None:
        by_kind = {a.kind: a for a in sorted(self.accelerators, key=_accel_sort_key)}
        if jetson := by_kind.get("nvidia-jetson"):
            family = jetson.detail("family")
            return f"jetson-{family}" if family else "jetson"
        if pi := by_kind.get("raspberry-pi"):
            return _rpi_slug(pi.name)
        if rk := by_kind.get("rockchip-npu"):
            return rk.detail("soc") or "rockchip"
        return None


def _cpu_tier(cpu: CpuInfo) -> str | None:
    flags = cpu.flags
    if cpu.arch == "x86_64":
        if "avx512f" in flags:
            tier = "avx512"
        elif "avx2" in flags:
            tier = "avx2"
        elif "sse4_2" in flags:
            tier = "sse4"
        else:
            tier = "base"
        if cpu.supports_bf16:
            tier += "-bf16"
        if flags & _AMX_FLAGS:
            tier += "-amx"
        return tier
    if cpu.arch == "aarch64":
        for flag, name in (("sve2", "sve2"), ("sve", "sve"), ("asimd", "neon")):
            if flag in flags:
                tier = name
                break
        else:
            tier = "base"
        if cpu.supports_bf16:
            tier += "-bf16"
        return tier
    return None


def _rpi_slug(model: str) -> str:
    variant = model.removeprefix("Raspberry Pi").strip()
    variant = re.split(r"\s+(?:Model|Rev)\b", variant, maxsplit=1)[0]
    variant = re.sub(r"Compute Module\s*", "CM", variant, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")
    if not slug:
        return "rpi"
    return f"rpi{slug}" if slug[0].isdigit() else f"rpi-{slug}"


def _accel_sort_key(
    a: Accelerator,
) -> tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    return (a.kind, a.name, a.evidence, a.details)


# --------------------------------------------------------------------------------------------
# Reading a (possibly fake) root safely


class _Tree:
    """Path joins under ``root`` and reads that skip anything odd instead of raising."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self._real_root = os.path.realpath(root)
        except (OSError, ValueError):
            self._real_root = str(root)
        self.is_host = self._real_root == os.sep

    def path(self, device_path: str) -> Path:
        return self.root / device_path.lstrip("/")

    def _inside(self, p: Path) -> bool:
        """False when following symlinks from ``p`` would leave a fake root."""
        if self.is_host:
            return True
        try:
            real = os.path.realpath(p)
        except (OSError, ValueError):
            return False
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    def exists(self, device_path: str) -> bool:
        p = self.path(device_path)
        try:
            return self._inside(p) and os.path.exists(p)
        except (OSError, ValueError):
            return False

    def read_bytes(self, device_path: str, limit: int = _SMALL_FILE) -> bytes | None:
        """The first ``limit`` bytes of a regular file, or None if it is not one or unreadable."""
        p = self.path(device_path)
        if not self._inside(p):
            return None
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks: list[bytes] = []
            remaining = limit
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 65536))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    def read_text(self, device_path: str, limit: int = _SMALL_FILE) -> str | None:
        """A file's text, or None if it is unreadable or not UTF-8."""
        data = self.read_bytes(device_path, limit)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def read_dt_string(self, device_path: str) -> str | None:
        """A device-tree string property: its NUL terminator stripped, None if empty."""
        text = self.read_text(device_path)
        if text is None:
            return None
        text = text.split("\0", 1)[0].strip()
        return text or None

    def read_hex(self, device_path: str) -> int | None:
        """A sysfs id such as ``0x10de`` or ``10de``, or None."""
        text = self.read_text(device_path, limit=64)
        if text is None:
            return None
        try:
            return int(text.strip(), 16)
        except ValueError:
            return None

    def list(self, device_dir: str, pattern: str) -> list[str]:
        """Sorted entry names in a directory that fully match ``pattern`` (a regex)."""
        p = self.path(device_dir)
        if not self._inside(p):
            return []
        try:
            names = os.listdir(p)
        except (OSError, ValueError):
            return []
        regex = re.compile(pattern)
        return sorted(n for n in names if regex.fullmatch(n))

    def link_name(self, device_path: str) -> str | None:
        """The last component of a symlink's target (never followed), or None."""
        p = self.path(device_path)
        if not self._inside(p.parent):
            return None
        try:
            return os.path.basename(os.readlink(p)) or None
        except (OSError, ValueError):
            return None

    def uevent(self, device_dir: str) -> dict[str, str]:
        """A sysfs ``uevent`` file as a dict (``DRIVER``, ``PCI_SLOT_NAME``, ...)."""
        text = self.read_text(f"{device_dir}/uevent") or ""
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def driver(self, device_dir: str) -> str | None:
        """The kernel driver bound to a sysfs device, from ``uevent`` or the ``driver`` link."""
        return self.uevent(device_dir).get("DRIVER") or self.link_name(f"{device_dir}/driver")


@dataclass(frozen=True)
class _PciDevice:
    address: str
    vendor: int
    device: int
    pci_class: int

    @property
    def sysfs(self) -> str:
        return f"/sys/bus/pci/devices/{self.address}"

    @property
    def pci_id(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


class _Probe:
    """One scan's view of the tree, caching what several rules read."""

    def __init__(self, tree: _Tree) -> None:
        self.tree = tree
        self.dt_model = tree.read_dt_string("/proc/device-tree/model")
        raw = tree.read_text("/proc/device-tree/compatible") or ""
        self.dt_compatible = tuple(s.strip() for s in raw.split("\0") if s.strip())
        self.pci = self._pci_devices()
        self.tegra_release = tree.read_text("/etc/nv_tegra_release")

    def _pci_devices(self) -> tuple[_PciDevice, ...]:
        devices = []
        for address in self.tree.list("/sys/bus/pci/devices", r"[0-9a-fA-F:.]+"):
            base = f"/sys/bus/pci/devices/{address}"
            vendor = self.tree.read_hex(f"{base}/vendor")
            device = self.tree.read_hex(f"{base}/device")
            if vendor is None or device is None:
                continue
            pci_class = self.tree.read_hex(f"{base}/class")
            devices.append(_PciDevice(address.lower(), vendor, device, pci_class or 0))
        return tuple(devices)

    def pci_by_vendor(self, vendor: int) -> list[_PciDevice]:
        return [d for d in self.pci if d.vendor == vendor]


# --------------------------------------------------------------------------------------------
# CPU


def _parse_cpuinfo(text: str) -> tuple[dict[str, str], int, frozenset[str]]:
    """First value of each key, the number of ``processor`` entries, the common flags."""
    first: dict[str, str] = {}
    processors = 0
    common: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        first.setdefault(key, value)
        if key == "processor":
            processors += 1
        elif key in {"flags", "Features"}:
            found = set(value.split()) & _INTERESTING_FLAGS
            common = found if common is None else common & found
    return first, processors, frozenset(common or ())


def _host_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _scan_cpu(tree: _Tree, probe: _Probe, arch: str | None, cores: int | None) -> CpuInfo:
    text = tree.read_text("/proc/cpuinfo", limit=_CPUINFO_MAX) or ""
    first, processors, flags = _parse_cpuinfo(text)
    model = (
        first.get("model name")
        or first.get("Model")
        or first.get("Hardware")
        or probe.dt_model
        or _UNKNOWN
    )
    if cores is None:
        cores = _host_cores() if tree.is_host else max(1, processors)
    return CpuInfo(
        arch=normalise_arch(arch if arch is not None else platform.machine()),
        model=model,
        cores=cores,
        flags=flags,
    )


def scan_cpu(
    root: Path = HOST_ROOT, *, arch: str | None = None, cores: int | None = None
) -> CpuInfo:
    """The CPU part of :func:`scan`.

    ``arch`` defaults to ``platform.machine()``; ``cores`` to the CPUs this process may run on
    (``sched_getaffinity``) on the real root, or the ``processor`` entries of a fake tree.
    """
    tree = _Tree(root)
    return _scan_cpu(tree, _Probe(tree), arch, cores)


# --------------------------------------------------------------------------------------------
# Accelerator rules: each takes the probe and returns what it found.

_TEGRA_FAMILIES = (  # (regex on the board model, device-tree SoC) -> family
    ("thor", "tegra264"),
    ("orin", "tegra234"),
    ("xavier", "tegra194"),
    ("tx2", "tegra186"),
    ("nano", "tegra210"),
    ("tx1", "tegra210"),
)
_L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def _tegra_soc(probe: _Probe) -> str | None:
    for entry in probe.dt_compatible:
        if m := re.fullmatch(r"nvidia,(tegra\d+)", entry):
            return m.group(1)
    return None


def _is_jetson(probe: _Probe) -> bool:
    model = probe.dt_model or ""
    return (
        probe.tegra_release is not None
        or "jetson" in model.lower()
        or "nvidia" in model.lower()
        or _tegra_soc(probe) is not None
    )


def _detect_jetson(probe: _Probe) -> list[Accelerator]:
    if not _is_jetson(probe):
        return []
    evidence = []
    l4t = None
    release = probe.tegra_release
    if release is not None:
        evidence.append("/etc/nv_tegra_release")
        if m := _L4T_RE.search(release):
            l4t = f"{m.group(1)}.{m.group(2)}"
    model = probe.dt_model or ""
    if model:
        evidence.append("/proc/device-tree/model")
    soc = _tegra_soc(probe)
    family = None
    for name, _ in _TEGRA_FAMILIES:
        if re.search(rf"\b{name}\b", model, re.IGNORECASE):
            family = name
            break
    if family is None and soc is not None:
        family = next((n for n, s in _TEGRA_FAMILIES if s == soc), None)
    if "jetson" in model.lower() or "nvidia" in model.lower():
        name = model
    else:
        name = "NVIDIA Jetson" + (f" {family.capitalize()}" if family else "")
    return [_accel("nvidia-jetson", name, evidence, family=family, soc=soc, l4t=l4t)]


def _nvidia_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _detect_nvidia_gpu(probe: _Probe) -> list[Accelerator]:
    tree = probe.tree
    gpus: dict[str, dict[str, Any]] = {}
    for address in tree.list("/proc/driver/nvidia/gpus", r"[0-9a-fA-F:.]+"):
        path = f"/proc/driver/nvidia/gpus/{address}/information"
        text = tree.read_text(path)
        if text is None:
            continue
        info = _nvidia_info(text)
        evidence = [path]
        minor = info.get("Device Minor", "")
        if minor.isdigit() and tree.exists(f"/dev/nvidia{minor}"):
            evidence.append(f"/dev/nvidia{minor}")
        gpus[address.lower()] = {"model": info.get("Model"), "evidence": evidence, "pci": None}
    for dev in probe.pci_by_vendor(0x10DE):
        if dev.pci_class >> 16 != 0x03:  # display controllers only, not the card's audio function
            continue
        entry = gpus.setdefault(dev.address, {"model": None, "evidence": [], "pci": None})
        entry["pci"] = dev
        entry["evidence"].insert(0, f"{dev.sysfs}/vendor")
    if _is_jetson(probe):
        # The integrated GPU of a Jetson is the nvidia-jetson entry; only real PCIe cards count.
        gpus = {k: v for k, v in gpus.items() if v["pci"] is not None}
    found = []
    for entry in gpus.values():
        pci: _PciDevice | None = entry["pci"]
        name = entry["model"] or (f"NVIDIA GPU ({pci.pci_id})" if pci else "NVIDIA GPU")
        found.append(
            _accel("nvidia-gpu", name, entry["evidence"], pci_id=pci.pci_id if pci else None)
        )
    if not gpus and not _is_jetson(probe):
        for node in tree.list("/dev", r"nvidia\d+"):
            found.append(_accel("nvidia-gpu", "NVIDIA GPU", [f"/dev/{node}"]))
    return found


# DRM vendor -> (kind, vendor label)
_DRM_VENDORS: Mapping[int, tuple[str, str]] = {
    0x8086: ("intel-gpu", "Intel"),
    0x1002: ("amd-gpu", "AMD"),
}
_INTEL_IGPU_SLOT = "0000:00:02.0"  # Intel integrated graphics always sit at 00:02.0


def _detect_drm_gpus(probe: _Probe) -> list[Accelerator]:
    tree = probe.tree
    all_render = [f"/dev/dri/{n}" for n in tree.list("/dev/dri", r"renderD\d+")]
    if not all_render:
        return []
    found = []
    for card in tree.list("/sys/class/drm", r"card\d+"):
        device = f"/sys/class/drm/{card}/device"
        vendor = tree.read_hex(f"{device}/vendor")
        if vendor is None or vendor not in _DRM_VENDORS:
            continue
        kind, label = _DRM_VENDORS[vendor]
        device_id = tree.read_hex(f"{device}/device")
        # The card's own render node if sysfs says which one; otherwise any render node.
        own = [f"/dev/dri/{n}" for n in tree.list(f"{device}/drm", r"renderD\d+")]
        render = [p for p in own if tree.exists(p)] if own else all_render
        if not render:
            continue
        slot = tree.uevent(device).get("PCI_SLOT_NAME", "").lower()
        if kind == "intel-gpu" and slot:
            name = f"Intel {'integrated' if slot == _INTEL_IGPU_SLOT else 'discrete'} GPU"
        else:
            name = f"{label} GPU"
        pci_id = f"{vendor:04x}:{device_id:04x}" if device_id is not None else None
        found.append(_accel(kind, name, [f"{device}/vendor", *render], pci_id=pci_id))
    return found


_INTEL_NPU_NAMES: Mapping[int, str] = {
    0x7D1D: "Intel NPU (Meteor Lake)",
    0xAD1D: "Intel NPU (Arrow Lake)",
    0x643E: "Intel NPU (Lunar Lake)",
    0xB03E: "Intel NPU (Panther Lake)",
}
# Drivers of /dev/accel devices that another rule reports (the Rockchip NPU's mainline driver).
_ACCEL_DRIVERS_ELSEWHERE = frozenset({"rocket"})


def _detect_accel(probe: _Probe) -> list[Accelerator]:
    tree = probe.tree
    found = []
    for node in tree.list("/dev/accel", r"accel\d+"):
        device = f"/sys/class/accel/{node}/device"
        vendor = tree.read_hex(f"{device}/vendor")
        device_id = tree.read_hex(f"{device}/device")
        driver = tree.driver(device)
        if driver in _ACCEL_DRIVERS_ELSEWHERE:
            continue
        pci_id = (
            f"{vendor:04x}:{device_id:04x}"
            if vendor is not None and device_id is not None
            else None
        )
        evidence = [f"/dev/accel/{node}"]
        if vendor is not None:
            evidence.append(f"{device}/vendor")
        if vendor == 0x8086 or driver == "intel_vpu":
            name = _INTEL_NPU_NAMES.get(device_id or -1, "Intel NPU")
            found.append(_accel("intel-npu", name, evidence, pci_id=pci_id))
        else:
            label = f"Compute accelerator ({pci_id or driver or node})"
            found.append(_accel("generic-accel", label, evidence, pci_id=pci_id, driver=driver))
    return found


@dataclass(frozen=True)
class _PciRule:
    kind: str
    vendor: int
    names: Mapping[int, str]
    default_name: str
    devnode: str  # regex for nodes in /dev


_PCI_RULES = (
    _PciRule("hailo", 0x1E60, {0x2864: "Hailo-8"}, "Hailo AI accelerator", r"hailo\d+"),
    _PciRule(
        "coral-edgetpu",
        0x1AC1,
        {0x089A: "Coral Edge TPU (PCIe)"},
        "Coral Edge TPU (PCIe)",
        r"apex_\d+",
    ),
)


def _detect_pci_rules(probe: _Probe) -> list[Accelerator]:
    """PCIe accelerators seen as PCI ids and/or device nodes: one entry per device."""
    found = []
    for rule in _PCI_RULES:
        devices = probe.pci_by_vendor(rule.vendor)
        nodes = [f"/dev/{n}" for n in probe.tree.list("/dev", rule.devnode)]
        for i in range(max(len(devices), len(nodes))):
            dev = devices[i] if i < len(devices) else None
            node = nodes[i] if i < len(nodes) else None
            evidence = [f"{dev.sysfs}/vendor"] if dev else []
            evidence += [node] if node else []
            if dev is None:
                name = rule.default_name
            elif dev.device in rule.names:
                name = rule.names[dev.device]
            else:
                name = f"{rule.default_name} ({dev.pci_id})"
            found.append(_accel(rule.kind, name, evidence, pci_id=dev.pci_id if dev else None))
    return found


# USB (idVendor, idProduct) -> (kind, name). A Coral USB changes id once its firmware is loaded,
# so the id goes into the evidence, not the (fingerprinted) details.
_USB_DEVICES: Mapping[tuple[int, int], tuple[str, str]] = {
    (0x1A6E, 0x089A): ("coral-edgetpu", "Coral Edge TPU (USB)"),
    (0x18D1, 0x9302): ("coral-edgetpu", "Coral Edge TPU (USB)"),
}


def _detect_usb(probe: _Probe) -> list[Accelerator]:
    tree = probe.tree
    found = []
    for entry in tree.list("/sys/bus/usb/devices", r"[0-9a-zA-Z.\-]+"):
        base = f"/sys/bus/usb/devices/{entry}"
        vendor = tree.read_hex(f"{base}/idVendor")
        product = tree.read_hex(f"{base}/idProduct")
        if vendor is None or product is None or (vendor, product) not in _USB_DEVICES:
            continue
        kind, name = _USB_DEVICES[(vendor, product)]
        evidence = [f"{base}/idVendor", f"usb:{vendor:04x}:{product:04x}"]
        found.append(_accel(kind, name, evidence, bus="usb"))
    return found


_ROCKCHIP_SOCS = ("rk3588s", "rk3588", "rk3576", "rk3568", "rk3566")
_RKNPU_DRIVERS = frozenset({"rknpu", "rocket"})


def _detect_rockchip(probe: _Probe) -> list[Accelerator]:
    soc = None
    for entry in probe.dt_compatible:
        vendor, _, chip = entry.partition(",")
        if vendor == "rockchip" and chip in _ROCKCHIP_SOCS:
            soc = chip
            break
    if soc is None:
        return []
    tree = probe.tree
    evidence = ["/proc/device-tree/compatible"]
    npu = [p for p in ("/sys/kernel/debug/rknpu", "/dev/rknpu") if tree.exists(p)]
    npu += [f"/sys/class/devfreq/{n}" for n in tree.list("/sys/class/devfreq", r".*npu.*")]
    npu += [
        f"/sys/bus/platform/drivers/{n}"
        for n in tree.list("/sys/bus/platform/drivers", r"(?i)rknpu|rocket")
        if n.lower() in _RKNPU_DRIVERS
    ]
    if not npu:
        return []
    family = "rk3588" if soc == "rk3588s" else soc
    name = f"Rockchip {soc.upper()} NPU"
    return [_accel("rockchip-npu", name, evidence + npu, soc=family, board=probe.dt_model)]


def _detect_raspberry_pi(probe: _Probe) -> list[Accelerator]:
    model = probe.dt_model
    if model is None or not model.startswith("Raspberry Pi"):
        return []
    soc = next((c.partition(",")[2] for c in probe.dt_compatible if c.startswith("brcm,bcm")), None)
    return [_accel("raspberry-pi", model, ["/proc/device-tree/model"], soc=soc)]


_RULES: tuple[tuple[str, Callable[[_Probe], list[Accelerator]]], ...] = (
    ("nvidia-gpu", _detect_nvidia_gpu),
    ("nvidia-jetson", _detect_jetson),
    ("drm", _detect_drm_gpus),
    ("accel", _detect_accel),
    ("pci", _detect_pci_rules),
    ("usb", _detect_usb),
    ("rockchip", _detect_rockchip),
    ("raspberry-pi", _detect_raspberry_pi),
)


def _detect(probe: _Probe) -> tuple[Accelerator, ...]:
    found: list[Accelerator] = []
    for rule_name, rule in _RULES:
        try:
            found.extend(rule(probe))
        except Exception:  # a rule bug or a bizarre file must not stop the agent starting
            logger.debug("inventory rule %s failed", rule_name, exc_info=True)
    return tuple(sorted(set(found), key=_accel_sort_key))


def detect_accelerators(root: Path = HOST_ROOT) -> tuple[Accelerator, ...]:
    """The accelerators (and boards) under ``root``, sorted by kind, name and evidence."""
    return _detect(_Probe(_Tree(root)))


# --------------------------------------------------------------------------------------------
# OS


def _os_release(tree: _Tree) -> str | None:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        text = tree.read_text(path)
        if text is None:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "PRETTY_NAME":
                try:
                    words = shlex.split(value)
                except ValueError:
                    words = [value.strip().strip("\"'")]
                pretty = " ".join(words).strip()
                return pretty or None
    return None


def _kernel(tree: _Tree) -> str | None:
    if tree.is_host:
        return platform.release() or None
    text = (tree.read_text("/proc/sys/kernel/osrelease") or "").strip()
    return text or None


def scan(root: Path = HOST_ROOT, *, arch: str | None = None, cores: int | None = None) -> Inventory:
    """Scan the machine (or the fake tree at ``root``) and return its :class:`Inventory`.

    ``arch`` overrides ``platform.machine()``; ``cores`` overrides the logical CPU count (see
    :func:`scan_cpu`). Never raises for anything found in the tree.
    """
    tree = _Tree(root)
    probe = _Probe(tree)
    return Inventory(
        cpu=_scan_cpu(tree, probe, arch, cores),
        accelerators=_detect(probe),
        os_release=_os_release(tree),
        kernel=_kernel(tree),
    )
