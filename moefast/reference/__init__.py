"""moefast.reference: plain-PyTorch ops, the specification of every fast op (same signatures).

Owns: what each fast op must compute, written for reading. Never imports anything of moefast
above configuration and precision: no fast op, module, model, data, training or output.
"""

from __future__ import annotations

__all__: list[str] = []
