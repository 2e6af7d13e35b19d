"""The CPU engine (``kind = cpu``): MiniLM embeddings and a trained intent head, no GPU, no vision.

``engine`` (``CpuEngine``, what ``guard.engines.build_engine`` serves), ``head`` (the trained head and the
long-post windows), ``novel`` (the novel-risk phrase), ``data`` (the head's templated training set),
``metrics`` (average precision, isotonic calibration), ``prototype`` (the nearest-prototype baseline the
head replaced) and ``report`` (the held-out report: ``python -m guard.engines.cpu.report``).
"""
