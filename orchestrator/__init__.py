"""The distributed layer: Ray scheduling, MLflow tracking and the ``ditscale`` command.

Importing it changes nothing in the process: the environment Ray needs is set by
``orchestrator.ray_env.configure_process_env``, which the ``ditscale`` command calls first
thing and ``ensure_ray`` calls before it imports Ray.
"""
