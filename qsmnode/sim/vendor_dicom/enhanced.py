"""The enhanced writer: one Philips-like Enhanced MR Image Storage file holding every frame
(magnitude then phase, slice, echo fastest), with its functional groups and dimensions."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from qsmnode.acquisition import GAMMA_BAR_HZ_PER_T, MultiEchoGRE
from qsmnode.dicom.geometry import plane_geometry
from qsmnode.sim.vendor_dicom.encoding import (
    PHILIPS_PHASE_INTERCEPT,
    PHILIPS_PHASE_SLOPE,
    PHILIPS_PHASE_SLOPE_TEXT,
    STORED_MAX,
    encode_echoes,
    encode_magnitude,
    encode_phase_philips,
    magnitude_scale,
)
from qsmnode.sim.vendor_dicom.header import (
    common_attributes,
    ds_list,
    ds_text,
    folder_name,
    item,
    real_world_value_mapping,
    save_dataset,
    seq,
    tr_ms,
)
from qsmnode.sim.vendor_dicom.study import ENHANCED_MR_IMAGE_STORAGE, SimStudyInfo, sim_uid


def write_enhanced(
    gre: MultiEchoGRE, out_dir: Path, style: str, study: SimStudyInfo
) -> list[Path]:
    """Write ``gre`` as one Enhanced MR Image Storage file; return it (one path)."""
    ni, nj, nk = gre.shape
    ne = gre.n_echoes
    geo = plane_geometry(gre.affine, nk)
    n = study.series_number
    ds = common_attributes(gre, study, style, n)
    uid = study.sop_instance_uid(style, n, 1)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = uid
    ds.InstanceNumber = 1
    flavor = "T2_STAR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "MIXED"]
    del ds.AcquisitionDate, ds.AcquisitionTime  # not in the Enhanced MR IOD
    duration_s = tr_ms(gre, study) * nj * nk / 1000.0
    ds.AcquisitionDateTime = study.study_date + study.study_time
    ds.AcquisitionDuration = duration_s
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MIXED"
    ds.AcquisitionContrast = "T2_STAR"
    ds.ContentQualification = "RESEARCH"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImageComments = "simulated by qsmnode"
    ds.AcquisitionContextSequence = seq()
    # MR Pulse Sequence module
    ds.PulseSequenceName = "FFE"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    ds.NumberOfFrames = 2 * nk * ne
    # dimensions: stack, in-stack position, magnitude/phase, echo
    dim_uid = sim_uid(study.seed, "dimension-organization", style, n)
    ds.DimensionOrganizationSequence = seq(item(DimensionOrganizationUID=dim_uid))
    dims = [
        (0x00209056, 0x00209111, "Stack ID"),
        (0x00209057, 0x00209111, "In-Stack Position Number"),
        (0x00089208, 0x00189226, "Complex Image Component"),
        (0x00189082, 0x00189114, "Effective Echo Time"),
    ]
    ds.DimensionIndexSequence = seq(
        *(
            item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=pointer,
                FunctionalGroupPointer=group,
                DimensionDescriptionLabel=label,
            )
            for pointer, group, label in dims
        )
    )
    shared = item(
        PlaneOrientationSequence=seq(item(ImageOrientationPatient=ds_list(geo.orientation))),
        PixelMeasuresSequence=seq(
            item(
                SliceThickness=ds_text(study.slice_thickness_mm or geo.slice_spacing),
                SpacingBetweenSlices=ds_text(geo.slice_spacing),
                PixelSpacing=ds_list(geo.pixel_spacing),
            )
        ),
        MRTimingAndRelatedParametersSequence=seq(
            item(
                RepetitionTime=ds_text(tr_ms(gre, study)),
                FlipAngle=ds_text(study.flip_angle_deg),
                EchoTrainLength=ne,
                RFEchoTrainLength=0,
                GradientEchoTrainLength=ne,
                SpecificAbsorptionRateSequence=seq(
                    item(
                        SpecificAbsorptionRateDefinition="IEC_HEAD",
                        SpecificAbsorptionRateValue=0.5,
                    )
                ),
                OperatingModeSequence=seq(
                    *(
                        item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")
                        for kind in ("STATIC FIELD", "RF", "GRADIENT")
                    )
                ),
                GradientOutputType="DB_DT",
                GradientOutput=20.0,
            )
        ),
        MRFOVGeometrySequence=seq(
            item(
                InPlanePhaseEncodingDirection="COLUMN",
                MRAcquisitionFrequencyEncodingSteps=ni,
                MRAcquisitionPhaseEncodingStepsInPlane=nj,
                MRAcquisitionPhaseEncodingStepsOutOfPlane=nk,
                PercentSampling="100",
                PercentPhaseFieldOfView="100",
            )
        ),
        MRModifierSequence=seq(
            item(
                InversionRecovery="NO",
                FlowCompensation="NONE",
                Spoiling="RF_AND_GRADIENT",
                T2Preparation="NO",
                SpectrallySelectedExcitation="NONE",
                SpatialPresaturation="NONE",
                PartialFourier="NO",
                ParallelAcquisition="NO",
            )
        ),
        MRImagingModifierSequence=seq(
            item(
                MagnetizationTransfer="NONE",
                BloodSignalNulling="NO",
                Tagging="NONE",
                TransmitterFrequency=GAMMA_BAR_HZ_PER_T * gre.field_strength_t / 1e6,
                PixelBandwidth=ds_text(study.pixel_bandwidth_hz),
            )
        ),
        MRReceiveCoilSequence=seq(
            item(
                ReceiveCoilName="SIM 32CH HEAD",
                ReceiveCoilManufacturerName="",
                ReceiveCoilType="MULTICOIL",
                QuadratureReceiveCoil="NO",
                MultiCoilDefinitionSequence=seq(
                    item(MultiCoilElementName="ALL", MultiCoilElementUsed="YES")
                ),
            )
        ),
        MRTransmitCoilSequence=seq(
            item(
                TransmitCoilName="SIM 8CH PTX",
                TransmitCoilManufacturerName="",
                TransmitCoilType="VOLUME",
            )
        ),
        MRAveragesSequence=seq(item(NumberOfAverages="1")),
        FrameAnatomySequence=seq(
            item(
                AnatomicRegionSequence=seq(
                    item(CodeValue="69536005", CodingSchemeDesignator="SCT", CodeMeaning="Head")
                ),
                FrameLaterality="U",
            )
        ),
    )
    ds.SharedFunctionalGroupsSequence = seq(shared)

    scale = magnitude_scale(gre)
    mag_slope = 1.0 / scale
    parts = [
        (
            "M",
            "MAGNITUDE",
            encode_echoes(gre.magnitude, lambda m: encode_magnitude(m, scale)),
            item(RescaleIntercept="0", RescaleSlope=ds_text(mag_slope), RescaleType="US"),
            item(
                WindowCenter=ds_text(STORED_MAX * mag_slope / 2),
                WindowWidth=ds_text(STORED_MAX * mag_slope),
            ),
            real_world_value_mapping(
                mag_slope, 0.0, "1", "no units", "Real World Value Mapping for normalized"
            ),
        ),
        (
            "P",
            "PHASE",
            encode_echoes(gre.phase, encode_phase_philips),
            item(
                RescaleIntercept=ds_text(PHILIPS_PHASE_INTERCEPT),
                RescaleSlope=PHILIPS_PHASE_SLOPE_TEXT,
                RescaleType="US",
            ),
            item(WindowCenter="0", WindowWidth="6284"),
            real_world_value_mapping(
                PHILIPS_PHASE_SLOPE,
                PHILIPS_PHASE_INTERCEPT,
                "mrad",
                "milliradian",
                "Real World Value Mapping for mrad",
            ),
        ),
    ]
    frame_time = study.study_date + study.study_time
    plane_positions = [seq(item(ImagePositionPatient=ds_list(p))) for p in geo.positions]
    echoes = [seq(item(EffectiveEchoTime=round(te * 1000.0, 6))) for te in gre.echo_times_s]
    frames: list[Dataset] = []
    pixel_chunks: list[bytes] = []
    for p_index, (letter, component, stored, pvt, voi, rwvm) in enumerate(parts, start=1):
        frame_type = seq(
            item(
                FrameType=["ORIGINAL", "PRIMARY", flavor, letter],
                PixelPresentation="MONOCHROME",
                VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE",
                ComplexImageComponent=component,
                AcquisitionContrast="T2_STAR",
            )
        )
        pvt_seq, voi_seq, rwvm_seq = seq(pvt), seq(voi), seq(rwvm)
        for k in range(nk):
            for e in range(ne):
                frame = Dataset()
                frame.FrameContentSequence = seq(
                    item(
                        FrameAcquisitionDateTime=frame_time,
                        FrameReferenceDateTime=frame_time,
                        FrameAcquisitionDuration=duration_s * 1000.0,
                        StackID="1",
                        InStackPositionNumber=k + 1,
                        DimensionIndexValues=[1, k + 1, p_index, e + 1],
                    )
                )
                frame.PlanePositionSequence = plane_positions[k]
                frame.MRImageFrameTypeSequence = frame_type
                frame.MREchoSequence = echoes[e]
                frame.PixelValueTransformationSequence = pvt_seq
                frame.FrameVOILUTSequence = voi_seq
                frame.RealWorldValueMappingSequence = rwvm_seq
                frames.append(frame)
                pixel_chunks.append(stored[e][k].tobytes())
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds[0x7FE00010] = DataElement(0x7FE00010, "OW", b"".join(pixel_chunks))
    path = out_dir / f"{n:04d}_{folder_name(study)}" / "00001.dcm"
    save_dataset(ds, path, ENHANCED_MR_IMAGE_STORAGE, uid)
    return [path]
