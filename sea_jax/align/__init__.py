"""SEA alignment: semantic labels, pair sampling and the contrastive loss."""
