from ris_stability.finding import Finding
from ris_stability.locate import Locator, locate_nonfinite
