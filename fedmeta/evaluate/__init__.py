"""The evaluation harness: FedMeta against the alternatives, on the same sites, splits and seeds.

Methods (every one scored on each site's held-out rows):

- ``local_only``: each site trains the same network alone on all its training rows;
- ``local_linear``, ``local_gbm``, ``local_cv``, ``local_best``: what a site builds alone with standard
  tools (:mod:`~fedmeta.evaluate.local`): cross-validated logistic/ridge regression, gradient boosting,
  the one of those and the MLP its own cross-validation picks (the bar to beat), and the best of the
  three on the held-out rows (a reference);
- ``local_only_k``: each site fits a scikit-learn model on only its K-shot support rows;
- ``pooled``: one network on all training sites' rows, centralized (what regulation forbids: the reference);
- ``fedavg``: FedAvg over Flower, the global model as is;
- ``fedavg_ft``: FedAvg's model fine-tuned on all of each site's training rows, early-stopped;
- ``fedmeta_<algorithm>``: meta-trained over Flower, then personalized at each site as
  ``fedmeta personalize`` does by default (:func:`~fedmeta.personalize.choose_personalization`);
- with ``peers``: ``pooled_oracle`` (pooled with a site indicator) and the
  personalized-FL peers of :mod:`fedmeta.evaluate.peers` (Ditto, FedRep,
  FedPer, FedBABU, APFL, Per-FedAvg), on the training sites.

About 20% of the sites never take part in training (``unseen``): the
methods that produce one model for everybody are scored on them as they are,
the personalizing ones after adaptation, which is meta-learning's
real promise. Accuracy is the mean over a site's classification tasks;
``worst10`` is the mean of the worst tenth of sites; the gap closed is
``(method - local_only) / (pooled - local_only)``.

One module per concept: :mod:`~fedmeta.evaluate.federations` (federations on
disk), :mod:`~fedmeta.evaluate.site_scores`, :mod:`~fedmeta.evaluate.baselines`
(local, pooled), :mod:`~fedmeta.evaluate.local` (what a site builds alone),
:mod:`~fedmeta.evaluate.families` (generator families at selection and fresh seeds), :mod:`~fedmeta.evaluate.peers` (personalized-FL peers in a
plain in-process loop), :mod:`~fedmeta.evaluate.harness` and
:mod:`~fedmeta.evaluate.tables`.
"""

from fedmeta.evaluate.baselines import local_only, local_only_k, pooled, pooled_oracle
from fedmeta.evaluate.federations import (
    Federation,
    digits_federation_on_disk,
    federation_on_disk,
    fedprox_federation_on_disk,
    folder_federation,
    hospital_federation_on_disk,
)
from fedmeta.evaluate.harness import ALGORITHMS, SHOTS_CURVE, MethodResult, Progress, Stages, evaluate, federated, run_config, upload_bytes
from fedmeta.evaluate.site_scores import aggregate, model_scores, shots_for, site_summary
from fedmeta.evaluate.tables import (
    LABELS,
    RESULT_COLUMNS,
    gap_closed,
    load_results,
    method_label,
    method_order,
    results_rows,
    results_table_from_json,
)
