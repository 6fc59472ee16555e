"""Print the precision that amp="auto" does *not* pick on this machine's CPU: "fp32" where
the CPU has native bf16 (auto trains in bf16), "bf16" elsewhere (auto trains in fp32, bf16 is
emulated). `make test` reruns the precision-dependent tests with REPRO_AMP set to it."""
from repro.train import cpu_native_bf16

print("fp32" if cpu_native_bf16() else "bf16")
