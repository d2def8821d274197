"""ConsistencyScheduler: one-step and multistep consistency sampling (Song et al. 2023, Algorithm 1).

A drop-in for diffusers' `CMStochasticIterativeScheduler`: the config keys and defaults are identical, so
`from_config` swaps work both ways and OpenAI's converted Hub repos load unchanged. On top of it this scheduler
takes explicit `sigmas` (iCT/ECT schedules), returns the `denoised` sample from `step`, accepts any noise level in
`add_noise`, hands the model float32 timesteps, never syncs host and device in `step`, and draws no noise after the
final step.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, deprecate
from diffusers.utils.torch_utils import randn_tensor

from .parameterization import (
    boundary_scalings,
    clamp_denoised,
    consistency_output,
    karras_sigmas,
    renoise,
    sigma_to_t,
    t_to_sigma,
)
from .sampling import consistency_schedule


@dataclass
class ConsistencySchedulerOutput(BaseOutput):
    """
    Output of [`ConsistencyScheduler.step`].

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next noise level of the schedule (the model input of the next step). After the final
            step it equals `denoised`.
        denoised (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The consistency model's estimate f(x, sigma) of the clean sample at this step.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class ConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """
    Multistep and one-step sampling for consistency models, in EDM sigma space.

    The sampled noise levels come from an N-point Karras grid (`num_train_timesteps` points, index 0 = `sigma_max`),
    as in diffusers' [`CMStochasticIterativeScheduler`], or from explicit `sigmas`.

    Args:
        num_train_timesteps (`int`, defaults to 40):
            Number of points N of the Karras grid the model was trained on.
        sigma_min (`float`, defaults to 0.002):
            Smallest noise level (the paper's epsilon, where f(x, epsilon) = x).
        sigma_max (`float`, defaults to 80.0):
            Largest noise level.
        sigma_data (`float`, defaults to 0.5):
            Standard deviation of the data distribution used by the boundary scalings.
        s_noise (`float`, defaults to 1.0):
            Scale of the noise added between steps.
        rho (`float`, defaults to 7.0):
            Exponent of the Karras grid.
        clip_denoised (`bool`, defaults to `True`):
            Whether to clamp the denoised sample to [-1, 1].
    """

    _compatibles = ["CMStochasticIterativeScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        s_noise: float = 1.0,
        rho: float = 7.0,
        clip_denoised: bool = True,
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be at least 2, got {num_train_timesteps}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        self.init_noise_sigma = sigma_max
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_sigmas(karras_sigmas(num_train_timesteps, sigma_min, sigma_max, rho), device=None, final=False)

    # ------------------------------------------------------------------------------------------------------------
    # Step bookkeeping, as in diffusers

    @property
    def step_index(self):
        """The index of the current noise level; advances by one after each `step`."""
        return self._step_index

    @property
    def begin_index(self):
        """The index of the first step, set by the pipeline with `set_begin_index` (avoids a timestep lookup)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def __len__(self):
        return self.config.num_train_timesteps

    def sigma_to_t(self, sigmas):
        """The network time input t(sigma) = 250 ln(sigma) (numpy in, numpy out; tensor in, tensor out)."""
        return sigma_to_t(sigmas)

    def get_scalings_for_boundary_condition(self, sigma):
        """(c_skip, c_out) of the consistency parameterization, as diffusers names them."""
        c_skip, c_out, _ = boundary_scalings(sigma, self.config.sigma_min, self.config.sigma_data)
        return c_skip, c_out

    # ------------------------------------------------------------------------------------------------------------
    # Schedules

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ):
        """
        Sets the noise levels to sample at. Pass exactly one of the three schedule arguments.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of network evaluations; the levels are evenly spaced indices of the training grid, as in
                diffusers (1 step samples at `sigma_max`).
            device (`str` or `torch.device`, *optional*):
                Device for `timesteps` (the sigmas stay on the CPU, so `step` never syncs).
            timesteps (`list[int]`, *optional*):
                Strictly descending indices into the `num_train_timesteps`-point grid (index 0 = `sigma_max`), as
                diffusers takes them: `[22, 0]` is OpenAI's 2-step ImageNet-64 schedule `ts=0,22,39`.
            sigmas (`list[float]`, *optional*):
                Strictly descending noise levels within [`sigma_min`, `sigma_max`] (e.g. for iCT/ECT models).
        """
        new_sigmas = consistency_schedule(self.config, num_inference_steps, timesteps, sigmas)
        self.custom_timesteps = num_inference_steps is None
        self.num_inference_steps = len(new_sigmas)
        self._set_sigmas(new_sigmas, device=device, final=True)

    def _set_sigmas(self, sigmas: np.ndarray, device, final: bool):
        # Timesteps are computed in float64 and handed to the model as float32: a UNet never sees float64, and
        # the values equal what diffusers' UNet computes after its own float64 -> float32 cast.
        self.timesteps = torch.from_numpy(sigma_to_t(sigmas)).to(device=device, dtype=torch.float32)
        if final:
            sigmas = np.concatenate([sigmas, [self.config.sigma_min]])
        # Sigmas stay on the CPU: `step` reads them as host scalars and never waits for the device.
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self._step_index = None
        self._begin_index = None

    # ------------------------------------------------------------------------------------------------------------
    # Sampling

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of `timestep` in the schedule (a host sync if it is a device tensor; pipelines avoid it by
        calling `set_begin_index(0)`)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device, schedule_timesteps.dtype)
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not in the current schedule {self.timesteps.tolist()}; pass one of "
                "`scheduler.timesteps`, or call `set_begin_index`."
            )
        return int(matches[1 if len(matches) > 1 else 0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Scales the model input by c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        _, _, c_in = boundary_scalings(self.sigmas[self._step_index], self.config.sigma_min, self.config.sigma_data)
        return sample * c_in

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> ConsistencySchedulerOutput | tuple:
        """
        One step of Algorithm 1: denoised = f(x, sigma); then, unless this is the last step,
        prev_sample = denoised + sqrt(sigma_next^2 - sigma_min^2) * s_noise * z.

        Args:
            model_output (`torch.Tensor`): The network output F(c_in * x, t(sigma)).
            timestep (`float` or `torch.Tensor`): The current entry of `scheduler.timesteps`.
            sample (`torch.Tensor`): The current noisy sample x.
            generator (`torch.Generator`, *optional*): Generator for the noise added between steps.
            return_dict (`bool`, defaults to `True`): Return a [`ConsistencySchedulerOutput`] instead of a tuple.

        Returns:
            [`ConsistencySchedulerOutput`] or `tuple` `(prev_sample, denoised)`.
        """
        if isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
        ):
            raise ValueError(
                "`step` takes an entry of `scheduler.timesteps` (a float noise-level time), not an integer index "
                "such as the counter of `enumerate(timesteps)`."
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.sigmas) - 1:
            raise ValueError("`step` was called after the final step of the schedule; call `set_timesteps` again.")

        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        denoised = consistency_output(model_output, sample, sigma, self.config.sigma_min, self.config.sigma_data)
        denoised = clamp_denoised(denoised, self.config.clip_denoised)

        if self._step_index + 1 < len(self.timesteps):
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            sigma_next = sigma_next.clamp(self.config.sigma_min, self.config.sigma_max)
            prev_sample = renoise(denoised, sigma_next, noise, self.config.sigma_min, self.config.s_noise)
        else:
            prev_sample = denoised  # the final step: no noise is drawn

        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return ConsistencySchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
        grid_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        x_sigma = x + sigma * noise at any noise levels, not only those of the current schedule. Pass exactly one of
        `timesteps`, `sigmas` or `grid_indices`.

        Args:
            original_samples (`torch.Tensor`): Clean samples x, shape (B, ...).
            noise (`torch.Tensor`): Standard normal noise of the same shape.
            timesteps (`torch.Tensor`, *optional*): Per-sample (or one shared) network times t = 250 ln(sigma), as in
                `scheduler.timesteps` (diffusers' meaning). Integer tensors are still read as grid indices, with a
                deprecation warning: pass them as `grid_indices`.
            sigmas (`torch.Tensor`, *optional*): Per-sample (or one shared) noise levels.
            grid_indices (`torch.Tensor`, *optional*): Integer indices into the `num_train_timesteps`-point training
                grid (0 = sigma_max).
        """
        given = [name for name, value in (("timesteps", timesteps), ("sigmas", sigmas), ("grid_indices", grid_indices))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"Pass exactly one of `timesteps`, `sigmas` or `grid_indices` to add_noise, got {given}.")
        if timesteps is not None:
            timesteps = torch.as_tensor(timesteps, device=original_samples.device)
            if torch.is_floating_point(timesteps):
                sigmas = t_to_sigma(timesteps.double())
            else:
                deprecate("integer timesteps in add_noise", "1.0.0", "Integer `timesteps` in `add_noise` are read as "
                          "training-grid indices; pass them as `grid_indices=` (`timesteps` means t = 250 ln sigma).")
                grid_indices = timesteps
        if grid_indices is not None:
            grid_indices = torch.as_tensor(grid_indices, device=original_samples.device)
            n_train = self.config.num_train_timesteps
            if torch.is_floating_point(grid_indices) or (grid_indices < 0).any() or (grid_indices >= n_train).any():
                raise ValueError(f"`grid_indices` must be integers in [0, {n_train - 1}].")
            grid = torch.from_numpy(karras_sigmas(n_train, self.config.sigma_min, self.config.sigma_max,
                                                  self.config.rho)).to(original_samples.device)
            sigmas = grid[grid_indices]
        sigmas = torch.as_tensor(sigmas, device=original_samples.device).to(original_samples.dtype).flatten()
        if sigmas.numel() not in (1, original_samples.shape[0]):
            raise ValueError(
                f"Got {sigmas.numel()} noise levels for a batch of {original_samples.shape[0]}; pass one per sample "
                "or a single one."
            )
        sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigmas
