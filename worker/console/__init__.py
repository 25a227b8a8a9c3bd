"""The operator's side: the ``cxr-triage`` CLI, the web page, status, health, ``up`` and the
demo.

This floor sits above the Celery pipeline: it may import anything in ``worker``, ``trainer``,
``dicom_node`` and ``db``, and nothing below it imports ``worker.console``
(``tests/test_structure.py`` holds that).
"""
