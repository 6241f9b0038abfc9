"""The fast path: installs the fast kernels (kernels.py, kernels_attention.py) in backend as the
path "fast", each under the name of the reference function it replaces. Importing the tools
package runs this once; backend.use("fast") then chooses it."""
from .. import backend
from . import kernels, kernels_attention

backend.install("fast", {name: getattr(module, name)
                         for module in (kernels, kernels_attention)
                         for name in backend.REFERENCE if hasattr(module, name)})
