"""The batch jobs' Celery app for Celery's own tools, configured as `sharedllm worker` is (its
defaults and SHAREDLLM_<FLAG> variables, e.g. SHAREDLLM_BROKER_URL):

    celery --app sharedllm.celery_app flower
    celery --app sharedllm.celery_app inspect active

Workers are started with `sharedllm worker`, which builds its app from its flags instead.
"""

from __future__ import annotations

from sharedllm.cli.worker import settings_from_environment
from sharedllm.common.batch import tasks
from sharedllm.common.batch.app import BatchApp

app = BatchApp(settings_from_environment())
tasks.register(app)
