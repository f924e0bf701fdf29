"""pspc_jax: exact, fast training-free patch-based diffusion denoisers (Niedoba et al., ICML 2025).

Public API (all array functions are pure and `jax.jit`-compatible):

  edm_sigmas, edm_preconditioning               EDM noise grid and network preconditioning
  empirical_denoise                             optimal empirical denoiser (Eq. 6-7)
  pspc_square_denoise, pspc_denoise             PSPC composites of square / arbitrary masks (Eq. 9-11)
  pspc_flex_denoise, flex_masks, ...            PSPC-Flex: masks from sensitivity maps, λ(σ) schedules
  gaussian_stats, gaussian_denoise              Gaussian (linear) denoiser
  els_denoise, ls_denoise, cfdm_denoise         ELS/LS machines (Kamb & Ganguli), σ-CFDM (Scarvelis et al.)
  sample, latents_from_seeds, seed_keys         PF-ODE samplers (Euler / Heun / churn)
  SigmaSchedule, cifar10_patch_schedule, ...    σ → patch size schedules
  Denoiser, EmpiricalDenoiser, ...              denoisers as pytree values (pass them into jax.jit)
  make_denoiser, register, available_denoisers  denoiser values by name
  build_denoiser                                the same from file options (maps file, checkpoint), sharded
  make_mesh, shard, shard_dataset               a denoiser's dataset sharded over devices/hosts (shard_map)
  sensitivity_maps, SensitivityMaps, ...        gradient sensitivity maps (Eq. 8), Fig. 3 sides
  load_maps, save_maps                          sensitivity-maps files (pspc_jax.maps_files)
  make_network, edm_denoiser                    Flax DDPM++/NCSN++/DiT and their EDM-preconditioned D(z, σ)
  attribute, pixel_attribution, contributor_counts  attribution of samples to training images
  argmin_schedule, ErrorSurface                 schedule tuning: s(σ), λ(σ) of least MSE to a reference
                                                (the resumable job: pspc_jax.jobs.tune.tune_run)
  patch_posterior_means                         per-window posterior means (patch analysis, Fig. 4)
  similarity_matrix, memorisation_stats, ...    sample comparisons, memorisation (pspc_jax.evaluation)
                                                (the resumable jobs: pspc_jax.jobs.evaluate.evaluate_run,
                                                MSE by σ, Fig. 2/4/6; pspc_jax.jobs.compare.compare_run)

Checkpoints (`pspc_jax.checkpoints.load_network`), training (`pspc_jax.training`) and weight import
(`pspc_jax.convert`) import orbax/optax and are left to their modules.
"""

from pspc_jax.attribution import (Attribution, attribute, contributor_counts, image_totals,
                                  pixel_attribution, pixel_top_k)
from pspc_jax.denoiser_options import build_denoiser
from pspc_jax.denoisers.cfdm import cfdm_denoise
from pspc_jax.denoisers.empirical import empirical_denoise
from pspc_jax.denoisers.els import els_denoise, ls_denoise
from pspc_jax.denoisers.flex import SensitivityMaps, flex_masks, pspc_flex_denoise
from pspc_jax.denoisers.gaussian import GaussianStats, gaussian_denoise, gaussian_stats
from pspc_jax.denoisers.pspc import patch_posterior_means, pspc_denoise, pspc_square_denoise
from pspc_jax.denoisers.registry import available_denoisers, make_denoiser, register
from pspc_jax.denoisers.values import (CFDMDenoiser, Denoiser, ELSDenoiser, EmpiricalDenoiser,
                                      GaussianDenoiser, NetworkDenoiser, PSPCDenoiser,
                                      PSPCFlexDenoiser, PSPCSquareDenoiser, make_flex_denoiser)
from pspc_jax.distributed import ShardedDenoiser, make_mesh, shard, shard_dataset
from pspc_jax.edm import edm_preconditioning, edm_sigmas
from pspc_jax.evaluation import memorisation_stats, register_descriptor, similarity_matrix
from pspc_jax.maps_files import load_maps, save_maps
from pspc_jax.nets import make_network
from pspc_jax.nets.precond import edm_denoiser
from pspc_jax.sampling import Trajectory, latents_from_seeds, sample, seed_keys
from pspc_jax.schedules import (SigmaSchedule, cifar10_flex_schedule, cifar10_patch_schedule,
                                on_edm_grid, parse_patch_schedule, parse_threshold_schedule,
                                patch_schedule_for)
from pspc_jax.sensitivity import (maps_for_sigma, sensitivity_map, sensitivity_maps,
                                  square_capture_sides)
from pspc_jax.tuning import ErrorSurface, argmin_schedule

__version__ = "0.1.0"
