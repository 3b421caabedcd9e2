"""Latency-aware depth compression: ECDC (Kim et al., ICML 2023, "Efficient latency-aware
CNN depth compression via two-stage dynamic programming") and LayerMerge (Kim et al.,
ICML 2024, "LayerMerge: neural network depth compression through layer pruning and
merging").

Both choose which consecutive convolutions to merge into one (and, in LayerMerge, which
to drop) so that the summed measured latency of the merged pieces fits a budget while
the summed importance of the pieces is largest. `dp.py` holds the search itself as pure
functions over tables: the search space, ECDC's stage 1 (`t_opt`) and extended
importance, the exact dynamic program (`solve`), an exhaustive check (`brute_force`)
and the plan it returns (`Plan`, JSON schema `jaxprune.layermerge.plan/1`). `space.py`
builds the ECDC space of a model (ResNet-18, MobileNetV2) and turns a plan into the sites
to linearize, the activations to insert and the cuts `jaxprune.merge` keeps; `latency.py`
measures T(i, j) per segment on this device, as the layer merge makes of it.
The `layermerge` method itself (config, training, report) is not registered yet.
"""
