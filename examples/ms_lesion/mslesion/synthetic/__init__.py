"""The synthetic MS cohort: T1, T2, FLAIR and lesion masks written as NIfTI (demo and test data)."""
