"""A run's shared room: its files and the facts recorded about it.

* :mod:`memprof.run.files` -- the run folder's file names, its schema, reading and writing;
* :mod:`memprof.run.schema` -- the run document's shape check (pydantic);
* :mod:`memprof.run.facts` -- facts both describers record (nodes, package versions, the GPU,
  parameter count): the launcher's (:mod:`memprof.train.launched_run`) and the integrations'
  (:mod:`memprof.integrations.observed_run`);
* :mod:`memprof.run.deepspeed_shm` -- giving back DeepSpeed's CPU shared-memory segment, which the
  launcher and the integrations both must do.

It sits below ``memprof.measure``, ``memprof.report``, ``memprof.train`` and ``memprof.integrations``
and imports none of them.
"""
