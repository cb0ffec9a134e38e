"""The fold plan: where every BatchNorm goes and why not (``fold_plan.decide``), the policy the
user asked for and the typed decisions (``decision``), concat/sum checks (``combined``) and the
one speed check (``fold_cost``)."""
