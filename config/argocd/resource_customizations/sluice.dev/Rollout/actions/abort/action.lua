-- Put all traffic back on the stable revision now (kubectl sluice abort).
return request("abort")
