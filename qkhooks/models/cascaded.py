"""EfficientViT-MSRA (timm ``efficientvit_m*``) cascaded group attention: refused with the reason (METHODS.md C).

No block of the model is modelled, so ``skip_unmodelled=True`` leaves nothing to record and is refused too.
"""

from __future__ import annotations

from qkhooks.models.unsupported import UNMODELLED_FORMS

UNMODELLED_FORMS["timm.models.efficientvit_msra.CascadedGroupAttention"] = (
    "cascaded group attention within its local windows: head h projects its channel split plus head h-1's output "
    "(qkvs[h], a 1x1 conv + BatchNorm), so heads 1.. see an input that depends on the previous head's attention; every "
    "head's q then passes a depthwise k x k conv + BatchNorm (dws[h]) that mixes neighbouring tokens before the "
    "product, so no head's logits are x_i^T W_q^T W_k x_j of its input tokens (head 0 included) and modes of W_q^T W_k "
    "would not rebuild them; each head adds its own attention-bias table. qkhooks does not record maps from q and k "
    "computed inside the module yet, and every attention of the model is such a block")
