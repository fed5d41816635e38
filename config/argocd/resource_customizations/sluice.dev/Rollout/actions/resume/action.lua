-- Lift a pause made by an action or kubectl sluice pause (kubectl sluice resume).
return request("resume")
