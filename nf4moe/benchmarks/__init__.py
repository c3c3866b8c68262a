"""GPU benchmarks of one expert layer against its peers (``python -m nf4moe bench``).

``layer``: forward (eager and CUDA graph); ``train``: forward + backward.  Imported only by the ``bench``
command, never by ``import nf4moe``.
"""
