"""Robustness evaluation: ImageNet-C corruptions, ImageNet-P perturbations, natural adversarial
examples (ImageNet-A), FGSM / PGD, for any image classification dataset.

Corruptions and perturbations are batched torch operations (CPU or GPU) following Hendrycks'
reference definitions; the released ImageNet-C / CIFAR-10-C / ImageNet-A data can be evaluated
as they are. See :func:`evaluate_robustness` for the one-call API.
"""

from .attacks import NormalizedModel, fgsm, pgd
from .corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, PRESETS, corrupt, resolve_preset
from .metrics import (ALEXNET_CLEAN_ERROR, ALEXNET_CORRUPTION_ERRORS, ALEXNET_FLIP_PROBS, corruption_errors_to_ce,
                      flip_probability, flip_rates, mce, mean_corruption_error, mfr, relative_ce, relative_mce,
                      top5_distance)
from .perturbations import NOISE_PERTURBATIONS, PERTURBATIONS, perturbation_sequence, sequence_length
from .plots import plot_robustness
from .released import (evaluate_cifar10_c, evaluate_image_folder, evaluate_imagenet_a, evaluate_imagenet_c,
                       imagenet_a_mask)
from .suite import SUITES, RobustnessSettings, evaluate_robustness, save_results

__all__ = [
    "ALEXNET_CLEAN_ERROR", "ALEXNET_CORRUPTION_ERRORS", "ALEXNET_FLIP_PROBS", "ALL_CORRUPTIONS", "CORRUPTIONS",
    "EXTRA_CORRUPTIONS", "NOISE_PERTURBATIONS", "PERTURBATIONS", "PRESETS", "SUITES", "NormalizedModel",
    "RobustnessSettings", "corrupt", "corruption_errors_to_ce", "evaluate_cifar10_c", "evaluate_image_folder",
    "evaluate_imagenet_a", "evaluate_imagenet_c", "evaluate_robustness", "fgsm", "flip_probability", "flip_rates",
    "imagenet_a_mask", "mce", "mean_corruption_error", "mfr", "perturbation_sequence", "pgd", "plot_robustness",
    "relative_ce", "relative_mce", "resolve_preset", "save_results", "sequence_length", "top5_distance",
]
