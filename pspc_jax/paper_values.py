"""What Niedoba et al., *Towards a Mechanistic Explanation of Diffusion Model Generalization* (ICML
2025, arXiv 2411.19339) report in numbers, each with where the paper states it.

Section, figure and table numbers are those of the ICML 2025 text (Fig. 2: network vs optimal
denoiser; Fig. 3: sensitivity; Fig. 4: patch posterior means; Fig. 7: denoisers vs DDPM++; Fig. 8:
sampling trajectories; Fig. 9: sample similarity); earlier arXiv versions may number them otherwise.
Only numbers printed in the paper's text, captions or tables are kept here; values that exist only as
plotted curves or heat maps are not read off the figures (`bin/reproduce`'s report says "the paper
shows this only as a figure" for those). The CIFAR-10 schedules are the one exception: App. B plots
them (Fig. 10, Fig. 12) and the official release (github.com/plai-group/pspc, `pspc/denoisers.py`)
prints them; `pspc_jax.schedules` holds the values.

All values are for CIFAR-10 (32×32) and the EDM DDPM++ network unless said otherwise; t is the
paper's noise level, EDM's σ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pspc_jax import schedules


@dataclasses.dataclass(frozen=True)
class Reported:
  """A number (or small table) the paper reports.

  Attributes:
    value: the number, tuple or dict as the paper gives it.
    source: where: section / figure / table and what the sentence says.
  """
  value: Any
  source: str


# §3 / Fig. 2: network vs optimal (empirical) denoiser on the forward process.
FIG2_NUM_SIGMAS = Reported(150, "§3 (Fig. 2): MSE evaluated over 150 discrete values of t in "
                           "[0.01, 100]")
FIG2_SIGMA_RANGE = Reported((0.01, 100.0), "§3 (Fig. 2): t in [0.01, 100]")
FIG2_Z_PER_SIGMA = Reported(10_000, "§3 (Fig. 2): 10,000 z ~ p_t(z|x) p_D(x) per t, forward process")
FIG2_LARGE_ERROR_RANGE = Reported((0.3, 10.0), "§3: network denoisers have low MSE for small and "
                                  "large t but substantial error for t in [0.3, 10]")
FIG2_PEAK_SIGMA = Reported(3.0, "Fig. 2 caption: large errors around t = 3")

# §3.1 / Fig. 3: gradient sensitivity (Eq. 8).
SENSITIVITY_Z_PER_SIGMA = Reported(1_000, "§3.1 and §5.2: Eq. 8 averaged over 1,000 forward-process z "
                                   "per t (§5.2: for each t of the EDM sampling schedule)")
SENSITIVITY_PIXEL = Reported((15, 15), "Fig. 3 caption: heat maps of output pixel (15, 15)")
CAPTURE_50_SIDES = Reported({30.0: 13, 0.03: 3}, "§3.1: a 13×13 patch is required to capture 50 % "
                            "of the sensitivity at t = 30, a 3×3 patch at t = 0.03")
CAPTURE_MAJORITY_SIDE = Reported(15, "§3.1: for all t, the majority of the input gradient is "
                                 "concentrated within a 15×15 square around the output pixel")

# §4 / Fig. 4: patch posterior means.
PATCH_Z_PER_SIGMA = Reported(10_000, "§4 (Fig. 4 left): MSE averaged over every window and 10,000 "
                             "forward-process z")
PATCH_SIZES = Reported(schedules.PAPER_PATCH_SIZES, "Fig. 4 / Fig. 14 legend: 3×3 … 27×27 and "
                       "Optimal (32×32)")
PATCH_FORWARD_EXACT_BELOW = Reported(0.1, "§4: for t < 0.1 (and large t) patch posterior means match "
                                     "the optimal denoiser's patches regardless of patch size")
PATCH_REVERSE_GOOD_BELOW = Reported(5.0, "§4: on the reverse process, patch denoisers estimate the "
                                    "network's patches well for all t < 5")
PATCH_REVERSE_3X3_BELOW = Reported(0.3, "§4: … especially 3×3 patch denoisers when t < 0.3")
PATCH_BEATS_OPTIMAL_BELOW = Reported(3.0, "Fig. 4 caption: patch posterior means estimate the "
                                     "network's patches better than the optimal denoiser for all t < 3")

# §6 / Fig. 7: denoisers against DDPM++ on forward and reverse processes.
EVAL_STEPS = Reported({"CIFAR-10": 18, "FFHQ": 40, "AFHQ": 40},
                      "§6: the t values of the EDM sampling procedure, 18 steps (CIFAR-10), 40 steps "
                      "(FFHQ, AFHQ)")
EVAL_Z_PER_SIGMA = Reported({"CIFAR-10": 10_000, "FFHQ": 2_000, "AFHQ": 2_000},
                            "§6: for each t, 10,000 z from each process for CIFAR-10, 2000 for FFHQ "
                            "and AFHQ")
EVAL_REVERSE_SAMPLER = Reported("heun", "§6: reverse-process set from pretrained DDPM++ EDM models "
                                "with their default Heun sampler")
PSPC_BEATS_GAUSSIAN_RANGE = Reported((0.3, 3.0), "§6.1: compared to the Gaussian denoiser, PSPC "
                                     "generally has better MSE for t in [0.3, 3]")

# Appendix B: the tuned schedules (plotted in Fig. 10 and Fig. 12; values from the official release).
CIFAR10_PATCH_SCHEDULE = Reported(
    schedules.CIFAR10_PATCH_SIZES,
    "App. B / Fig. 10 (plotted); values: official release pspc/denoisers.py CIFAR_PATCH_SCHEDULE, on "
    "the 18-step EDM grid t = 80 … 0.002")
CIFAR10_FLEX_THRESHOLDS = Reported(
    schedules.CIFAR10_FLEX_THRESHOLDS,
    "App. B / Fig. 12 (plotted); values: official release pspc/denoisers.py CIFAR_THRESHOLD_SCHEDULE, "
    "on the 18-step EDM grid t = 80 … 0.002")
TUNING_PROCESS = Reported("forward", "App. B: schedules tuned by minimising the average patch "
                          "posterior mean error over forward-process samples (§5.1: the patch size "
                          "of lowest error versus the network denoiser, after Fig. 4)")

# §6.2, Fig. 9, App. C.1: samples from shared initial z.
SAMPLES_COUNT = Reported(1_000, "App. C.1: a shared set of 1000 z ~ π(z) per denoiser")
SAMPLES_SOLVER = Reported("euler", "App. C.1: deterministic PF-ODE sampling with an Euler solver "
                          "and the EDM sampling schedule")
SSCD_MEAN_VS_NETWORKS = Reported(
    {"pspc_flex": 0.55, "empirical": 0.34, "cfdm": 0.23, "gaussian": 0.34},
    "Fig. 9 caption: average SSCD cosine similarity of CIFAR-10 samples to those of the neural "
    "networks (NCSN++, DiT, DDPM++, U-ViT) from shared z")
SSCD_COPY_THRESHOLD = Reported(0.6, "§6.2: 0.6, the SSCD similarity threshold used to determine "
                               "copying by Zhang et al. (2023)")

# App. A, Table 3: the networks.
NETWORK_FID = Reported({"DDPM++": 1.97, "NCSN++": 1.98, "DiT": 9.08, "U-ViT": 3.08},
                       "App. A, Table 3: 50k FID of the CIFAR-10 diffusion models")

# Fig. 1: denoiser outputs on shared reverse-process z, one row per t.
FIG1_SIGMAS = Reported((8.4, 5.3, 3.3, 1.9, 1.1, 0.6, 0.3), "Fig. 1: rows t = 8.4, 5.3, 3.3, 1.9, "
                       "1.1, 0.6, 0.3 (reverse-process z of DDPM++)")
