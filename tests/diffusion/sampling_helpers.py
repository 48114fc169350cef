"""One call for the tests: a network ``net(x_t, t, context)`` sampled by registry name, with the
guidance and parameterisation wrapped as ``ldm_train.diffusion.sample_from_config`` wraps them."""
from ldm_train.diffusion import sample
from ldm_train.diffusion.guidance import guided


def run(name, net, noise, context, null_context, process, steps=None, *, guidance_scale=1.0, **kwargs):
    return sample(name, guided(net, context, null_context, guidance_scale), noise, process, steps, **kwargs)
