"""almak.sparse: pruning masks (magnitude, Wanda, SparseGPT; unstructured and N:M).

Pruners return masks (True = pruned); :func:`apply_mask_` applies one. The layer-by-layer calibration that
feeds Wanda and SparseGPT is :func:`almak.modeling.pipelines.calibrate.run_layerwise`, the same pass GPTQ uses, and
:func:`almak.modeling.pipelines.prune.prune_model` drives it for a whole model.
"""
from .magnitude import magnitude_mask
from .masks import Sparsity, apply_mask_, check_nm, mask_from_scores, nm_mask, row_mask, sparsity_of
from .sparsegpt import SparseGPT
from .wanda import Wanda

__all__ = ["Sparsity", "magnitude_mask", "Wanda", "SparseGPT", "apply_mask_", "check_nm", "mask_from_scores",
           "nm_mask", "row_mask", "sparsity_of"]
