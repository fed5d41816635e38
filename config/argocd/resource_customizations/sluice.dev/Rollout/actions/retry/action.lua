-- Start an aborted or rolled-back release again (kubectl sluice retry).
return request("retry")
