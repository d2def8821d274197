"""The one table of zero-shot editing tasks that `cm-diffusers edit`, the HTTP API's `/v1/edit/{task}` and the
pipeline's editing methods (`ConsistencyEditingMixin`) share. Plain data, no torch: the API's ingress reads it too."""

from dataclasses import dataclass


@dataclass(frozen=True)
class EditTask:
    """One editing task as every front end offers it: the pipeline method that runs it, its help line, the options
    it takes besides the image and the shared ones (seed, output), those it requires, whether it reads a mask, whether
    it edits an input image at all (interpolation does not), and the option that names its noise schedule."""

    method: str
    help: str
    fields: tuple = ("num_inference_steps", "timesteps", "sigmas", "class_labels")
    required: tuple = ()
    mask: bool = False
    image: bool = True
    schedule_field: str = "sigmas"


# The one table of editing tasks: `cm-diffusers edit`, the HTTP API's /v1/edit/{task} and the methods below.
EDIT_TASKS = {
    "inpaint": EditTask("inpaint", "Regenerate the white region of the mask, keep the rest of the image exactly.",
                        mask=True),
    "colorize": EditTask("colorize", "Colorize a grayscale image with an RGB model, keeping its luma."),
    "super-resolve": EditTask("super_resolve", "Upsample a low-resolution image by scale_factor to the model's size.",
                              fields=("scale_factor", "num_inference_steps", "timesteps", "sigmas", "class_labels"),
                              required=("scale_factor",)),
    "stroke": EditTask("stroke_edit", "Turn a rough stroke painting into a realistic image (SDEdit-like, 2 levels).",
                       fields=("timesteps", "sigmas", "class_labels")),
    "denoise": EditTask("denoise", "Denoise an image that carries Gaussian noise of std sigma (one network "
                        "evaluation).", fields=("sigma", "add_noise", "class_labels"), required=("sigma",),
                        schedule_field="sigma"),
    "interpolate": EditTask("interpolate", "Interpolate between two random noises and decode each frame.",
                            fields=("num_frames", "num_inference_steps", "timesteps", "sigmas", "class_labels"),
                            image=False),
}
