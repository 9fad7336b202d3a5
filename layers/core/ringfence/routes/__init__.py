"""HTTP routes of the control plane, one resolver per API, shared by every host: the Lambda
functions in ``functions/`` and ``ringfence serve`` build them and hand events to ``resolve``."""
