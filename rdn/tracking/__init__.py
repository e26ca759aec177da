"""MLflow tracking, in layers (each imports only those above it):

* :mod:`rdn.tracking.client`: the one client factory (:func:`~rdn.tracking.client.mlflow_client`),
  where the store is, short HTTP timeouts, the experiment lookup;
* :mod:`rdn.tracking.replay`: spill files of records MLflow could not take, and their replay;
* :mod:`rdn.tracking.run`: :class:`~rdn.tracking.run.StageRun`, the live run of one stage;
* :mod:`rdn.tracking.parent`: the pipeline's parent run and its summary of the stages' metrics;
* :mod:`rdn.tracking.compare`: ``rdn compare``, key metrics of runs side by side.
"""
