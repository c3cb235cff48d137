"""Adversarial OOD images: the feature-matching attack, attacked test sets and the k-NN without the targets."""

from lightning_ood.attacks.feature_matching import AttackResult, FeatureMatchingAttack, smoothness
from lightning_ood.attacks.knn import KNNWithoutTargets
from lightning_ood.attacks.sets import AttackedSets

__all__ = ["AttackResult", "AttackedSets", "FeatureMatchingAttack", "KNNWithoutTargets", "smoothness"]
