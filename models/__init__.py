"""The model zoo: importing this package registers every model and backbone."""
from models import backbones, deeplabv3plus, unet  # noqa: F401  (imported to register)
