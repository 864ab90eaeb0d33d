"""The processor this process runs on, as /proc/cpuinfo names it: the model and the ISA features that decide
CPU training speed (AVX2, AVX-512, AVX512-BF16, AMX)."""
import platform

# (name, /proc/cpuinfo flags, any of which means it is there)
ISA_FEATURES = (("AVX2", {"avx2"}), ("AVX-512", {"avx512f"}), ("AVX512-BF16", {"avx512_bf16"}),
                ("AMX", {"amx_bf16", "amx_tile"}))


def parse_cpuinfo(text):
    """(model name or None, ISA string such as "AVX2+AVX-512") from the text of /proc/cpuinfo."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor speaks for all
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), "+".join(name for name, names in ISA_FEATURES if flags & names)


def cpu_model_and_isa():
    """(model or None, ISA string) of this machine; ("<platform.processor()>", "") where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            model, isa = parse_cpuinfo(f.read())
    except OSError:
        model, isa = None, ""
    return model or platform.processor() or None, isa
