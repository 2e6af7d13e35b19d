"""One module per ``python -m bench`` section; importing this package registers them all
(``bench.harness.registry()``). A new section is a module here, decorated with ``@section``, imported
below."""

from bench.sections import cache, cpu, gpu, image_memory, memory, overhead

__all__ = ["cache", "cpu", "gpu", "image_memory", "memory", "overhead"]
