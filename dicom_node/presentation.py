"""Optional results that viewers show natively (both off by default; see Settings).

- A Grayscale Softcopy Presentation State per scored image: the hotspot (the heatmap's
  maximum) drawn as a circle with a label over the original radiograph, which stays
  windowable.  OHIF, Orthanc's viewers and Weasis apply it to the image.
- A Key Object Selection for a positive study: "For Referring Provider" is not right for
  an AI result, so the title is DCM 113000 "Of Interest"; it flags the scored images and
  names the model in its description.

UIDs follow the same rule as the SR and SC (:mod:`dicom_node.identity`): derived from
everything that shapes the content.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node import identity
from dicom_node.conformance import (
    build_charset,
    copy_laterality,
    no_person_name_warnings,
    restore_source_text,
    sanitise_source,
)
from dicom_node.results import OutputModel, ScoredImage
from dicom_node.sr_content import contributing_equipment, hotspot

log = logging.getLogger(__name__)

# Each changes whenever its builder changes what it writes, so new content gets new UIDs
# (GSPS pr-2: Body Part Examined is copied beside a stated Laterality, as in the SC).
_GSPS_BUILD = "pr-2"
_KOS_BUILD = "pr-1"
GSPS_CONTENT_LABEL = "AI_HOTSPOT"
GSPS_SERIES_DESCRIPTION = "AI HOTSPOT - NOT FOR DIAGNOSTIC USE"
KOS_SERIES_DESCRIPTION = "AI FLAG - NOT FOR DIAGNOSTIC USE"


def build_hotspot_gsps(scored: ScoredImage, model: OutputModel,
                       institution_name: str | None = None) -> Dataset | None:
    """A presentation state drawing the hotspot over the source, or None without one."""
    point = hotspot(scored.heatmap)
    if point is None:
        return None
    header = sanitise_source(scored.source)
    study_uid = str(header.StudyInstanceUID)
    source_uid = str(header.SOPInstanceUID)
    rows, cols = int(header.Rows), int(header.Columns)
    radius = max(8.0, min(rows, cols) / 20.0)
    digest = identity.content_digest(
        _GSPS_BUILD, hd.__version__, pydicom.__version__, header, list(point), radius,
        float(scored.probability), [model.name, model.version, model.sha256,
                                    model.threshold, model.manufacturer],
        institution_name or None,
    )
    layer = hd.pr.GraphicLayer(layer_name="AI", order=1,
                               description="cxr-triage hotspot")
    col, row = point
    circle = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[col, row], [min(col + radius, cols), row]]),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
    )
    label = hd.pr.TextObject(
        text_value=f"AI hotspot (relative attention), p={scored.probability:.2f}"[:64],
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        anchor_point=(col, max(1.0, row - radius)),
        anchor_point_visible=False,
    )
    with no_person_name_warnings():
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[header],
            series_instance_uid=identity.uid_from("series", "gsps", study_uid,
                                                  model.version, model.sha256),
            series_number=identity.series_number(identity.SC, model.version) + 100,
            sop_instance_uid=identity.instance_uid(identity.GSPS, [source_uid],
                                                   model.version, model.sha256, digest),
            instance_number=1,
            manufacturer=model.manufacturer[:64],
            manufacturer_model_name=model.name[:64],
            software_versions=model.version[:64],
            device_serial_number=model.sha256[:64],
            content_label=GSPS_CONTENT_LABEL,
            content_description="AI hotspot, not for diagnostic use",
            graphic_annotations=[hd.pr.GraphicAnnotation(
                referenced_images=[header], graphic_layer=layer,
                graphic_objects=[circle], text_objects=[label])],
            graphic_layers=[layer],
            institution_name=institution_name or None,
            contributing_equipment=[contributing_equipment(model)],
            specific_character_set=build_charset(header),
        )
    restore_source_text(gsps, header)
    gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
    copy_laterality(gsps, header)
    log.info("built hotspot GSPS %s for source %s of study %s", gsps.SOPInstanceUID,
             source_uid, study_uid)
    return gsps


def build_positive_kos(sources: Sequence[Dataset], model: OutputModel,
                       institution_name: str | None = None) -> Dataset:
    """A Key Object Selection flagging the scored images of a positive study."""
    if not sources:
        raise ValueError("a key object selection needs at least one image")
    headers = [sanitise_source(s) for s in sources]
    study_uid = str(headers[0].StudyInstanceUID)
    description = f"AI flag: COVID-19 positive by {model.name} {model.version}; " \
        "not for diagnostic use"
    digest = identity.content_digest(
        _KOS_BUILD, hd.__version__, pydicom.__version__, list(headers), description,
        [model.name, model.version, model.sha256, model.manufacturer],
        institution_name or None,
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid(model.version, model.sha256), name=model.name[:64],
            manufacturer_name=model.manufacturer[:64], model_name=model.version[:64]),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=headers,
        observer_device_context=device, description=description[:1024],
    )
    with no_person_name_warnings():
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=headers, content=content,
            series_instance_uid=identity.uid_from("series", "kos", study_uid,
                                                  model.version, model.sha256),
            series_number=identity.series_number(identity.SR, model.version) + 100,
            sop_instance_uid=identity.instance_uid(
                identity.KOS, [str(h.SOPInstanceUID) for h in headers], model.version,
                model.sha256, digest),
            instance_number=1,
            manufacturer=model.manufacturer[:64],
            institution_name=institution_name or None,
            contributing_equipment=[contributing_equipment(model)],
            specific_character_set=build_charset(headers[0]),
        )
    restore_source_text(kos, headers[0])
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    log.info("built positive-study KOS %s for study %s", kos.SOPInstanceUID, study_uid)
    return kos


__all__ = [
    "GSPS_CONTENT_LABEL",
    "GSPS_SERIES_DESCRIPTION",
    "KOS_SERIES_DESCRIPTION",
    "build_hotspot_gsps",
    "build_positive_kos",
]
