"""Compatibility shim: ``db.atomic`` is the owner (moved to the foundation floor).

Kept only so that branches written against the old path keep importing; new code imports
``db.atomic``.  Remove once nothing imports ``dicom_node.atomic``.
"""

from db.atomic import *  # noqa: F403
