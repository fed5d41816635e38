-- Skip the remaining steps and analysis (kubectl sluice promote --full).
return request("promoteFull")
