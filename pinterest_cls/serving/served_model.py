"""The served end-to-end model as MLflow builds it from code (``mlflow.pyfunc.log_model(python_model=<this
file>)``, see ``pinterest_cls.serving.pyfunc.log_pipeline``): no pickled Python object in the model."""

from mlflow.models import set_model

from pinterest_cls.serving.pyfunc import PinterestPyfuncModel

set_model(PinterestPyfuncModel())
