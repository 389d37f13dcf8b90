"""The distributed layer: Ray scheduling, MLflow tracking and the ``ditscale`` command.

Importing it changes nothing in the process. Ray is started or joined in one place,
``orchestrator.ray_env.ensure_ray``, which binds a local Ray to 127.0.0.1 by itself.
"""
