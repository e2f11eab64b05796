"""Pure training objectives (a leaf: may import ``dirl.model``, nothing above it).

``nelbo`` -- the blockwise masked-diffusion NELBO for SFT (DESIGN §6);
``autoregressive`` -- next-token SFT of a shifted-logit model (Dream's AR initialisation);
``advantages`` / ``likelihood`` / ``losses`` -- DiPO and the other RL estimators (DESIGN §7).
"""
