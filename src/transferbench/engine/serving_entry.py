"""The served model's code, for MLflow's "models from code": MLflow runs this file to build the pyfunc.

Logged by ``engine.serving.log_serving_model`` in place of a pickled object; see ``engine.serving``.
"""

from mlflow.models import set_model

from transferbench.engine.serving import ImageModel

set_model(ImageModel())
