"""Task weightings: per-task losses (and the Gram matrix of per-task
gradients) in, one weight per task out."""

from keras_mgda.weighting.aligned_mtl import AlignedMTL
from keras_mgda.weighting.base import Weighting
from keras_mgda.weighting.base import by_name
from keras_mgda.weighting.base import get
from keras_mgda.weighting.cagrad import CAGrad
from keras_mgda.weighting.conflict_free import ConFIG
from keras_mgda.weighting.cr_mogm import CRMOGM
from keras_mgda.weighting.db_mtl import DBMTL
from keras_mgda.weighting.dtp import DTP
from keras_mgda.weighting.dualproj import DualProj
from keras_mgda.weighting.dwa import DWA
from keras_mgda.weighting.excess_mtl import ExcessMTL
from keras_mgda.weighting.extensions import AfterUpdateHook
from keras_mgda.weighting.extensions import GradientAggregator
from keras_mgda.weighting.fairgrad import FairGrad
from keras_mgda.weighting.famo import FAMO
from keras_mgda.weighting.gls import GLS
from keras_mgda.weighting.graddrop import GradDrop
from keras_mgda.weighting.gradnorm import GradNorm
from keras_mgda.weighting.gradvac import GradVac
from keras_mgda.weighting.imtl import IMTLG
from keras_mgda.weighting.imtl_hybrid import IMTL
from keras_mgda.weighting.imtl_l import IMTLL
from keras_mgda.weighting.lbtw import LBTW
from keras_mgda.weighting.mgda import MGDA
from keras_mgda.weighting.moco import MoCo
from keras_mgda.weighting.nash_mtl import NashMTL
from keras_mgda.weighting.pcgrad import PCGrad
from keras_mgda.weighting.rlw import RLW
from keras_mgda.weighting.scale_invariant import ScaleInvariant
from keras_mgda.weighting.sdmgrad import SDMGrad
from keras_mgda.weighting.static import Static
from keras_mgda.weighting.stch import STCH
from keras_mgda.weighting.uncertainty import Uncertainty
from keras_mgda.weighting.uniform import Uniform
from keras_mgda.weighting.upgrad import UPGrad

__all__ = [
    "ConFIG",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "MoCo",
    "SDMGrad",
    "CRMOGM",
    "DBMTL",
    "FAMO",
    "GLS",
    "IMTL",
    "IMTLL",
    "RLW",
    "ScaleInvariant",
    "STCH",
    "AfterUpdateHook",
    "GradientAggregator",
    "AlignedMTL",
    "by_name",
    "CAGrad",
    "DTP",
    "DWA",
    "get",
    "GradNorm",
    "IMTLG",
    "LBTW",
    "MGDA",
    "NashMTL",
    "PCGrad",
    "Static",
    "Uncertainty",
    "Uniform",
    "UPGrad",
    "Weighting",
]
