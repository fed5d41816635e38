-- Hold the release where it is (kubectl sluice pause).
return request("pause")
