"""The hardware inventory: detection rules against fake device trees, slugs and fingerprints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.runtimes.inventory import (
    Accelerator,
    CpuInfo,
    Inventory,
    normalise_arch,
    scan,
)

# --------------------------------------------------------------------------------------------
# Building fake trees

SPR_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx "
    "fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs "
    "bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 "
    "monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic "
    "movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch "
    "cpuid_fault epb cat_l3 cat_l2 cdp_l3 invpcid_single intel_ppin cdp_l2 ssbd mba ibrs ibpb "
    "stibp ibrs_enhanced tpr_shadow flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 "
    "smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb "
    "intel_pt avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc "
    "cqm_occup_llc cqm_mbm_total cqm_mbm_local split_lock_detect avx_vnni avx512_bf16 wbnoinvd "
    "dtherm ida arat pln pts hfi vnmi avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes "
    "vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq la57 rdpid bus_lock_detect "
    "cldemote movdiri movdir64b enqcmd fsrm md_clear serialize tsxldtrk pconfig arch_lbr ibt "
    "amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities"
)
# A desktop Core i7 of the AVX2 era.
AVX2_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ht syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 "
    "x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm bmi1 avx2 smep bmi2 erms invpcid "
    "rdseed adx smap clflushopt xsaveopt xsavec xgetbv1 xsaves"
)
# Cortex-A78AE (Orin), Cortex-A76 (Pi 5, RK3588): FP16 arithmetic and dot product, no BF16.
A78_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp uscat ilrcpc flagm paca pacg"
)
A76_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp"
)


def put(root: Path, device_path: str, content: str | bytes = "") -> Path:
    """Write a file at ``device_path`` inside the fake tree (parents are real directories)."""
    path = root / device_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def mkdir(root: Path, device_path: str) -> Path:
    path = root / device_path.lstrip("/")
    path.mkdir(parents=True, exist_ok=True)
    return path


def x86_cpuinfo(root: Path, *, model: str, flags: str, count: int = 4) -> None:
    blocks = [
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
        f"flags\t\t: {flags}\nbogomips\t: 4000.00\n"
        for i in range(count)
    ]
    put(root, "/proc/cpuinfo", "\n".join(blocks))
    put(root, "/etc/os-release", 'NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\n')
    put(root, "/proc/sys/kernel/osrelease", "6.8.0-45-generic\n")


def arm_cpuinfo(root: Path, *, features: str, count: int, extra: str = "") -> None:
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0b\n"
        for i in range(count)
    ]
    put(root, "/proc/cpuinfo", "\n".join(blocks) + "\n" + extra)


def pci(root: Path, address: str, vendor: int, device: int, pci_class: int) -> None:
    base = f"/sys/bus/pci/devices/{address}"
    put(root, f"{base}/vendor", f"0x{vendor:04x}\n")
    put(root, f"{base}/device", f"0x{device:04x}\n")
    put(root, f"{base}/class", f"0x{pci_class:06x}\n")


def plain_avx2_pc(root: Path) -> Path:
    x86_cpuinfo(root, model="Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", flags=AVX2_FLAGS)
    pci(root, "0000:00:00.0", 0x8086, 0x3EC2, 0x060000)  # host bridge: not an accelerator
    return root


def sapphire_rapids(root: Path) -> Path:
    x86_cpuinfo(root, model="Intel(R) Xeon(R) Platinum 8480+", flags=SPR_FLAGS, count=8)
    return root


def jetson_orin(root: Path) -> Path:
    arm_cpuinfo(root, features=A78_FEATURES, count=12)
    put(
        root,
        "/etc/nv_tegra_release",
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, "
        "DATE: Mon May  6 17:34:21 UTC 2024\n# KERNEL_VARIANT: oot\n"
        "TARGET_USERSPACE_LIB_DIR=nvidia\n",
    )
    put(root, "/proc/device-tree/model", b"NVIDIA Jetson AGX Orin Developer Kit\0")
    put(
        root,
        "/proc/device-tree/compatible",
        b"nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0",
    )
    return root


def nvidia_pc(root: Path) -> Path:
    plain_avx2_pc(root)
    put(
        root,
        "/proc/driver/nvidia/gpus/0000:01:00.0/information",
        "Model: \t\t NVIDIA GeForce RTX 4090\nIRQ:   \t\t 185\n"
        "GPU UUID: \t GPU-5d1c1c5e-0000-0000-0000-000000000000\nVideo BIOS: \t 95.02.18.80.87\n"
        "Bus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n"
        "Bus Location: \t 0000:01:00.0\nDevice Minor: \t 0\nGPU Excluded:\t No\n",
    )
    pci(root, "0000:01:00.0", 0x10DE, 0x2684, 0x030000)
    pci(root, "0000:01:00.1", 0x10DE, 0x22BA, 0x040300)  # the card's HDMI audio function
    put(root, "/dev/nvidia0")
    put(root, "/dev/nvidiactl")
    put(root, "/dev/nvidia-uvm")
    return root


def intel_gpu_npu(root: Path) -> Path:
    x86_cpuinfo(root, model="Intel(R) Core(TM) Ultra 7 155H", flags=AVX2_FLAGS, count=16)
    card = "/sys/class/drm/card0/device"
    put(root, f"{card}/vendor", "0x8086\n")
    put(root, f"{card}/device", "0x7d55\n")
    put(root, f"{card}/uevent", "DRIVER=i915\nPCI_CLASS=30000\nPCI_SLOT_NAME=0000:00:02.0\n")
    mkdir(root, "/sys/class/drm/card0-eDP-1")  # a connector, not a card
    put(root, "/dev/dri/card0")
    put(root, "/dev/dri/renderD128")
    npu = "/sys/class/accel/accel0/device"
    put(root, f"{npu}/vendor", "0x8086\n")
    put(root, f"{npu}/device", "0x7d1d\n")
    put(root, f"{npu}/uevent", "DRIVER=intel_vpu\nPCI_SLOT_NAME=0000:00:0b.0\n")
    put(root, "/dev/accel/accel0")
    return root


def rpi5_with_usb_coral(root: Path, *, usb_id: tuple[str, str] = ("1a6e", "089a")) -> Path:
    arm_cpuinfo(
        root,
        features=A76_FEATURES,
        count=4,
        extra="Revision\t: d04170\nSerial\t\t: 9f3c1e2a5b6d7e8f\n"
        "Model\t\t: Raspberry Pi 5 Model B Rev 1.0\n",
    )
    put(root, "/proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\0")
    put(root, "/proc/device-tree/compatible", b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    put(root, "/sys/bus/usb/devices/usb1/idVendor", "1d6b\n")  # the root hub
    put(root, "/sys/bus/usb/devices/usb1/idProduct", "0002\n")
    put(root, "/sys/bus/usb/devices/1-1/idVendor", f"{usb_id[0]}\n")
    put(root, "/sys/bus/usb/devices/1-1/idProduct", f"{usb_id[1]}\n")
    mkdir(root, "/sys/bus/usb/devices/1-1:1.0")  # an interface: no ids
    return root


def pcie_coral_pc(root: Path) -> Path:
    plain_avx2_pc(root)
    put(root, "/dev/apex_0")
    return root


def hailo8_pc(root: Path) -> Path:
    plain_avx2_pc(root)
    pci(root, "0000:03:00.0", 0x1E60, 0x2864, 0x120000)
    put(root, "/dev/hailo0")
    return root


def rk3588_board(root: Path) -> Path:
    arm_cpuinfo(root, features=A76_FEATURES, count=8)
    put(root, "/proc/device-tree/model", b"Radxa ROCK 5B\0")
    put(root, "/proc/device-tree/compatible", b"radxa,rock-5b\0rockchip,rk3588\0")
    mkdir(root, "/sys/class/devfreq/fdab0000.npu")
    mkdir(root, "/sys/class/devfreq/dmc")
    return root


def kinds_and_names(inventory: Inventory) -> list[tuple[str, str]]:
    return [(a.kind, a.name) for a in inventory.accelerators]


# --------------------------------------------------------------------------------------------
# The scenarios


def test_sapphire_rapids_cpu_flags_and_class(tmp_path):
    inv = scan(sapphire_rapids(tmp_path), arch="x86_64")
    assert inv.cpu.arch == "x86_64"
    assert inv.cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert inv.cpu.cores == 8
    assert inv.cpu.flags == {
        "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni",
        "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile",
    }  # fmt: skip
    assert inv.cpu.supports_bf16
    assert inv.cpu.supports_fp16  # AVX512-FP16
    assert inv.accelerators == ()
    assert inv.hardware_class() == "x86_64-avx512-bf16-amx"
    assert inv.os_release == "Ubuntu 24.04.1 LTS"
    assert inv.kernel == "6.8.0-45-generic"


def test_avx2_box_has_no_bf16_and_f16c_is_not_fp16(tmp_path):
    inv = scan(plain_avx2_pc(tmp_path), arch="x86_64")
    assert inv.cpu.flags == {"sse4_2", "avx", "avx2", "fma", "f16c"}
    assert not inv.cpu.supports_bf16
    assert not inv.cpu.supports_fp16
    assert inv.accelerators == ()
    assert inv.hardware_class() == "x86_64-avx2"


def test_jetson_orin(tmp_path):
    inv = scan(jetson_orin(tmp_path), arch="aarch64")
    assert kinds_and_names(inv) == [("nvidia-jetson", "NVIDIA Jetson AGX Orin Developer Kit")]
    jetson = inv.accelerators[0]
    assert dict(jetson.details) == {"family": "orin", "soc": "tegra234", "l4t": "36.3.0"}
    assert "/etc/nv_tegra_release" in jetson.evidence
    assert inv.cpu.cores == 12
    assert inv.cpu.model == "NVIDIA Jetson AGX Orin Developer Kit"  # from the device tree
    assert inv.cpu.flags == {"asimd", "asimddp", "asimdhp", "fphp"}
    assert inv.cpu.supports_fp16
    assert not inv.cpu.supports_bf16
    assert inv.hardware_class() == "aarch64-jetson-orin"


def test_jetson_from_release_file_alone_and_its_gpu_node_is_not_a_discrete_gpu(tmp_path):
    put(tmp_path, "/etc/nv_tegra_release", "# R35 (release), REVISION: 4.1, GCID: 33958178\n")
    put(tmp_path, "/dev/nvidia0")  # OpenRM on recent Jetsons exposes the iGPU like this
    inv = scan(tmp_path, arch="aarch64")
    assert inv.kinds() == {"nvidia-jetson"}
    assert inv.accelerators[0].detail("l4t") == "35.4.1"
    assert inv.hardware_class() == "aarch64-jetson"


def test_nvidia_discrete_gpu(tmp_path):
    inv = scan(nvidia_pc(tmp_path), arch="x86_64")
    assert kinds_and_names(inv) == [("nvidia-gpu", "NVIDIA GeForce RTX 4090")]
    gpu = inv.accelerators[0]
    assert gpu.detail("pci_id") == "10de:2684"
    assert "/proc/driver/nvidia/gpus/0000:01:00.0/information" in gpu.evidence
    assert "/dev/nvidia0" in gpu.evidence
    assert inv.hardware_class() == "x86_64-avx2+nvidia-gpu"


def test_nvidia_without_driver_info_is_found_by_pci_or_device_node(tmp_path):
    by_pci = tmp_path / "pci"
    plain_avx2_pc(by_pci)
    pci(by_pci, "0000:01:00.0", 0x10DE, 0x2684, 0x030200)
    assert kinds_and_names(scan(by_pci, arch="x86_64")) == [
        ("nvidia-gpu", "NVIDIA GPU (10de:2684)")
    ]

    by_node = tmp_path / "node"
    plain_avx2_pc(by_node)
    put(by_node, "/dev/nvidia0")
    put(by_node, "/dev/nvidia1")
    put(by_node, "/dev/nvidiactl")
    inv = scan(by_node, arch="x86_64")
    assert [a.evidence for a in inv.accelerators] == [("/dev/nvidia0",), ("/dev/nvidia1",)]


def test_intel_igpu_and_npu(tmp_path):
    inv = scan(intel_gpu_npu(tmp_path), arch="x86_64")
    assert kinds_and_names(inv) == [
        ("intel-gpu", "Intel integrated GPU"),
        ("intel-npu", "Intel NPU (Meteor Lake)"),
    ]
    gpu, npu = inv.accelerators
    assert gpu.detail("pci_id") == "8086:7d55"
    assert "/dev/dri/renderD128" in gpu.evidence
    assert npu.detail("pci_id") == "8086:7d1d"
    assert npu.evidence[0] == "/dev/accel/accel0"
    assert inv.hardware_class() == "x86_64-avx2+intel-gpu+intel-npu"


def test_drm_card_without_render_node_is_not_usable(tmp_path):
    intel_gpu_npu(tmp_path)
    (tmp_path / "dev/dri/renderD128").unlink()
    assert scan(tmp_path, arch="x86_64").kinds() == {"intel-npu"}


def test_amd_gpu_and_unknown_accel_device(tmp_path):
    plain_avx2_pc(tmp_path)
    put(tmp_path, "/sys/class/drm/card1/device/vendor", "0x1002\n")
    put(tmp_path, "/sys/class/drm/card1/device/device", "0x744c\n")
    put(tmp_path, "/dev/dri/renderD129")
    put(tmp_path, "/sys/class/accel/accel0/device/vendor", "0x1da3\n")
    put(tmp_path, "/sys/class/accel/accel0/device/device", "0x1020\n")
    put(tmp_path, "/dev/accel/accel0")
    inv = scan(tmp_path, arch="x86_64")
    assert kinds_and_names(inv) == [
        ("amd-gpu", "AMD GPU"),
        ("generic-accel", "Compute accelerator (1da3:1020)"),
    ]
    assert inv.hardware_class() == "x86_64-avx2+accel+amd-gpu"


def test_raspberry_pi5_with_usb_coral(tmp_path):
    inv = scan(rpi5_with_usb_coral(tmp_path), arch="aarch64")
    assert kinds_and_names(inv) == [
        ("coral-edgetpu", "Coral Edge TPU (USB)"),
        ("raspberry-pi", "Raspberry Pi 5 Model B Rev 1.0"),
    ]
    coral, pi = inv.accelerators
    assert "usb:1a6e:089a" in coral.evidence
    assert pi.detail("soc") == "bcm2712"
    assert inv.cpu.model == "Raspberry Pi 5 Model B Rev 1.0"
    assert inv.cpu.cores == 4
    assert inv.cpu.supports_fp16
    assert inv.hardware_class() == "aarch64-rpi5+coral"


def test_usb_coral_fingerprint_survives_firmware_load(tmp_path):
    """The USB id changes once the runtime programs the TPU; the fingerprint must not."""
    before = scan(rpi5_with_usb_coral(tmp_path / "a"), arch="aarch64")
    after = scan(rpi5_with_usb_coral(tmp_path / "b", usb_id=("18d1", "9302")), arch="aarch64")
    assert after.kinds() == before.kinds()
    assert after.fingerprint() == before.fingerprint()


def test_pcie_coral(tmp_path):
    inv = scan(pcie_coral_pc(tmp_path), arch="x86_64")
    assert kinds_and_names(inv) == [("coral-edgetpu", "Coral Edge TPU (PCIe)")]
    assert inv.accelerators[0].evidence == ("/dev/apex_0",)
    assert inv.hardware_class() == "x86_64-avx2+coral"


def test_hailo8_one_device_from_pci_and_node(tmp_path):
    inv = scan(hailo8_pc(tmp_path), arch="x86_64")
    assert kinds_and_names(inv) == [("hailo", "Hailo-8")]
    hailo = inv.accelerators[0]
    assert hailo.detail("pci_id") == "1e60:2864"
    assert hailo.evidence == ("/sys/bus/pci/devices/0000:03:00.0/vendor", "/dev/hailo0")
    assert inv.hardware_class() == "x86_64-avx2+hailo"


def test_rk3588_board(tmp_path):
    inv = scan(rk3588_board(tmp_path), arch="aarch64")
    assert kinds_and_names(inv) == [("rockchip-npu", "Rockchip RK3588 NPU")]
    npu = inv.accelerators[0]
    assert dict(npu.details) == {"soc": "rk3588", "board": "Radxa ROCK 5B"}
    assert "/sys/class/devfreq/fdab0000.npu" in npu.evidence
    assert inv.cpu.cores == 8
    assert inv.hardware_class() == "aarch64-rk3588"


@pytest.mark.parametrize(
    "evidence", ["/dev/rknpu", "/sys/kernel/debug/rknpu", "/sys/bus/platform/drivers/RKNPU"]
)
def test_rockchip_npu_other_evidence(tmp_path, evidence):
    rk3588_board(tmp_path)
    (tmp_path / "sys/class/devfreq/fdab0000.npu").rmdir()
    mkdir(tmp_path, evidence)
    assert scan(tmp_path, arch="aarch64").kinds() == {"rockchip-npu"}


def test_rockchip_soc_without_npu_is_not_an_accelerator(tmp_path):
    rk3588_board(tmp_path)
    (tmp_path / "sys/class/devfreq/fdab0000.npu").rmdir()
    inv = scan(tmp_path, arch="aarch64")
    assert inv.accelerators == ()
    assert inv.hardware_class() == "aarch64-neon"


def test_empty_tree(tmp_path):
    inv = scan(tmp_path, arch="x86_64")
    assert inv.accelerators == ()
    assert inv.cpu == CpuInfo(arch="x86_64", model="unknown", cores=1, flags=frozenset())
    assert inv.os_release is None
    assert inv.kernel is None
    assert inv.hardware_class() == "x86_64-base"
    json.dumps(inv.to_dict())


def test_missing_root_does_not_raise(tmp_path):
    inv = scan(tmp_path / "does-not-exist", arch="aarch64", cores=2)
    assert inv.accelerators == ()
    assert inv.cpu.cores == 2


# --------------------------------------------------------------------------------------------
# Fingerprint, class, serialisation


def test_fingerprint_is_stable_and_changes_with_hardware(tmp_path):
    root = hailo8_pc(tmp_path)
    first, second = scan(root, arch="x86_64"), scan(root, arch="x86_64")
    assert first == second
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 16
    int(first.fingerprint(), 16)

    put(root, "/dev/apex_0")
    third = scan(root, arch="x86_64")
    assert third.kinds() == {"hailo", "coral-edgetpu"}
    assert third.fingerprint() != first.fingerprint()
    assert third.hardware_class() == "x86_64-avx2+coral+hailo"


def test_fingerprint_ignores_cores_evidence_os_and_device_order():
    cpu = CpuInfo(arch="x86_64", model="m", cores=4, flags=frozenset({"avx2"}))
    a = Accelerator("coral-edgetpu", "Coral Edge TPU (PCIe)", ("/dev/apex_0",))
    b = Accelerator("coral-edgetpu", "Coral Edge TPU (PCIe)", ("/dev/apex_1",))
    one = Inventory(cpu=cpu, accelerators=(a, b), os_release="Debian 12", kernel="6.1")
    two = Inventory(
        cpu=CpuInfo(arch="x86_64", model="m", cores=64, flags=frozenset({"avx2"})),
        accelerators=(b, a),
        os_release="Debian 13",
        kernel="6.12",
    )
    assert one.fingerprint() == two.fingerprint()
    assert one.with_runtime_devices("openvino", ["CPU", "GPU"]).fingerprint() == (
        two.with_runtime_devices("openvino", ["GPU", "CPU"]).fingerprint()
    )


def test_runtime_devices_merge_and_change_fingerprint(tmp_path):
    inv = scan(intel_gpu_npu(tmp_path), arch="x86_64")
    with_ov = inv.with_runtime_devices("openvino", ["CPU", "GPU", "NPU"])
    both = with_ov.with_runtime_devices("onnxruntime", ("CPUExecutionProvider",))
    assert inv.runtime_devices == ()
    assert both.runtime_devices == (
        ("onnxruntime", ("CPUExecutionProvider",)),
        ("openvino", ("CPU", "GPU", "NPU")),
    )
    replaced = both.with_runtime_devices("openvino", ["CPU"])
    assert dict(replaced.runtime_devices)["openvino"] == ("CPU",)
    assert len({inv.fingerprint(), with_ov.fingerprint(), both.fingerprint()}) == 3
    assert both.hardware_class() == inv.hardware_class()


def test_to_dict_is_json(tmp_path):
    inv = scan(jetson_orin(tmp_path), arch="aarch64").with_runtime_devices("litert", ["cpu"])
    doc = json.loads(json.dumps(inv.to_dict()))
    assert doc["cpu"]["flags"] == ["asimd", "asimddp", "asimdhp", "fphp"]
    assert doc["cpu"]["supports_fp16"] is True
    assert doc["accelerators"][0]["kind"] == "nvidia-jetson"
    assert doc["accelerators"][0]["details"]["l4t"] == "36.3.0"
    assert doc["runtime_devices"] == {"litert": ["cpu"]}
    assert doc["hardware_class"] == "aarch64-jetson-orin"
    assert doc["fingerprint"] == inv.fingerprint()
    assert hash(inv)  # frozen all the way down


@pytest.mark.parametrize(
    ("model", "slug"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", "aarch64-rpi5"),
        ("Raspberry Pi 4 Model B Rev 1.4", "aarch64-rpi4"),
        ("Raspberry Pi 400 Rev 1.0", "aarch64-rpi400"),
        ("Raspberry Pi Compute Module 4 Rev 1.0", "aarch64-rpi-cm4"),
        ("Raspberry Pi Zero 2 W Rev 1.0", "aarch64-rpi-zero-2-w"),
    ],
)
def test_raspberry_pi_slugs(model, slug):
    cpu = CpuInfo(arch="aarch64", model=model, cores=4, flags=frozenset({"asimd"}))
    inv = Inventory(cpu=cpu, accelerators=(Accelerator("raspberry-pi", model),))
    assert inv.hardware_class() == slug


@pytest.mark.parametrize(
    ("flags", "slug"),
    [
        ({"asimd"}, "aarch64-neon"),
        ({"asimd", "sve", "bf16", "i8mm"}, "aarch64-sve-bf16"),
        ({"asimd", "sve", "sve2"}, "aarch64-sve2"),
        (set(), "aarch64-base"),
    ],
)
def test_arm_cpu_tiers(flags, slug):
    cpu = CpuInfo(arch="aarch64", model="m", cores=1, flags=frozenset(flags))
    assert Inventory(cpu=cpu).hardware_class() == slug


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("arm64", "aarch64"), ("aarch64", "aarch64"),
     ("armv7l", "armv7l"), ("", "unknown")],
)  # fmt: skip
def test_normalise_arch(machine, arch):
    assert normalise_arch(machine) == arch


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown accelerator kind"):
        Accelerator("tpu", "x")


def test_details_are_sorted_and_hashable():
    acc = Accelerator("hailo", "Hailo-8", details=(("z", "1"), ("a", "2")))
    assert acc.details == (("a", "2"), ("z", "1"))
    assert acc.to_dict()["details"] == {"a": "2", "z": "1"}
    assert len({acc, Accelerator("hailo", "Hailo-8", details=(("a", "2"), ("z", "1")))}) == 1


# --------------------------------------------------------------------------------------------
# Odd trees: skipped, never raised


def test_unreadable_and_odd_files_are_skipped(tmp_path):
    mkdir(tmp_path, "/proc/cpuinfo")  # a directory where a file is expected
    put(tmp_path, "/proc/device-tree/model", b"Raspberry Pi \xff\xfe\0")  # not UTF-8
    put(tmp_path, "/etc/os-release", b'PRETTY_NAME="\xc3\x28"\n')  # not UTF-8
    mkdir(tmp_path, "/etc/nv_tegra_release")  # a directory, not a Jetson
    put(tmp_path, "/sys/class/drm/card0/device/vendor", "0xzzzz\n")  # not hex
    mkdir(tmp_path, "/sys/class/drm/card1/device/vendor")  # a directory again
    put(tmp_path, "/dev/dri/renderD128")
    put(tmp_path, "/sys/bus/pci/devices/0000:03:00.0/vendor", b"\x80\x81")
    put(tmp_path, "/sys/bus/pci/devices/0000:03:00.0/device", "0x2864\n")
    put(tmp_path, "/proc/driver/nvidia/gpus/0000:01:00.0/information", b"Model: \xff\n")
    put(tmp_path, "/sys/bus/usb/devices/1-1/idVendor", "")  # empty
    put(tmp_path, "/sys/bus/usb/devices/1-1/idProduct", "089a\n")
    fifo = tmp_path / "sys/class/drm/card2/device/vendor"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # reading a FIFO would block: it must be skipped, not read
    inv = scan(tmp_path, arch="aarch64")
    assert inv.accelerators == ()
    assert inv.cpu.model == "unknown"
    assert inv.os_release is None


def test_odd_cpuinfo_lines_are_tolerated(tmp_path):
    put(
        tmp_path,
        "/proc/cpuinfo",
        "garbage without a colon\nprocessor : 0\nflags : avx2 avx512f\n\nprocessor : 1\n"
        "flags : avx2\n: no key\n",
    )
    cpu = scan(tmp_path, arch="x86_64").cpu
    assert cpu.cores == 2
    assert cpu.flags == {"avx2"}  # only what every logical CPU has


def test_symlinks_may_not_escape_a_fake_root(tmp_path):
    outside = tmp_path / "outside"
    put(outside, "/pci/0000:00:02.0/vendor", "0x8086\n")
    put(outside, "/pci/0000:00:02.0/device", "0x7d55\n")
    root = tmp_path / "root"
    put(root, "/dev/dri/renderD128")
    mkdir(root, "/sys/class/drm/card0")
    (root / "sys/class/drm/card0/device").symlink_to(outside / "pci/0000:00:02.0")
    mkdir(root, "/proc/device-tree")
    (root / "proc/device-tree/model").symlink_to("/proc/self/status")
    inv = scan(root, arch="x86_64")
    assert inv.accelerators == ()

    # A relative link that stays inside the tree is followed, as sysfs needs.
    put(root, "/sys/devices/pci0000:00/0000:00:02.0/vendor", "0x8086\n")
    (root / "sys/class/drm/card0/device").unlink()
    (root / "sys/class/drm/card0/device").symlink_to("../../../devices/pci0000:00/0000:00:02.0")
    assert scan(root, arch="x86_64").kinds() == {"intel-gpu"}


# --------------------------------------------------------------------------------------------
# The real machine


def test_scan_of_this_machine_does_not_raise():
    inv = scan()
    assert inv.cpu.arch in {"x86_64", "aarch64"}
    assert inv.cpu.cores >= 1
    assert inv.kinds() <= {
        "nvidia-gpu", "nvidia-jetson", "intel-gpu", "intel-npu", "amd-gpu", "coral-edgetpu",
        "hailo", "rockchip-npu", "raspberry-pi", "generic-accel",
    }  # fmt: skip
    json.dumps(inv.to_dict())
    assert inv.fingerprint() == scan().fingerprint()
