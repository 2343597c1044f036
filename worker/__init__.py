"""The compression worker: Celery app, the job store in Redis and artifact storage.

Importing this package (or any module in it) never imports torch: the library is imported
inside the task, in a fresh pool child, so no CUDA context exists before a job starts.
"""
