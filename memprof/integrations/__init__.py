"""memprof inside other people's training loops.

* :mod:`memprof.integrations.transformers` -- ``MemprofCallback`` for HF ``Trainer``;
* :mod:`memprof.integrations.accelerate` -- ``profile_accelerate`` for a custom accelerate loop.

Both drive one :class:`memprof.measure.MemoryProfiler` per rank through
:class:`memprof.integrations.recorder.MicroStepRecorder` and write the usual run files
(``rank<R>.jsonl``, ``memprof.json``, ``report.html``). See docs/integrations.md.
"""
